"""`kvmem.block_allocator.BlockAllocator`: exact block ids and their order, errors, and a model-based fuzz.

In the style of vLLM's block-pool tests: every test states the ids it expects, in order. The policy
under test is page-aware allocation: fullest mapped slot first, lowest slot among equals, lowest
block id first within a slot; ids come back slot by slot, ascending within each slot.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmem.block_allocator import BlockAllocator


def allocator(blocks_per_slot: int = 4, max_slots: int = 4, mapped: tuple[int, ...] = ()) -> BlockAllocator:
    a = BlockAllocator(blocks_per_slot, max_slots)
    for slot in mapped:
        a.add_slot(slot)
    return a


def shaped(in_use: dict[int, list[int]], blocks_per_slot: int = 4, max_slots: int = 4) -> BlockAllocator:
    """An allocator with `in_use[slot]` the blocks in use on each mapped slot (all others free)."""
    a = allocator(blocks_per_slot, max_slots, tuple(in_use))
    everything = a.alloc(a.get_num_free_blocks())
    keep = {b for blocks in in_use.values() for b in blocks}
    a.free([b for b in everything if b not in keep])
    assert a.get_num_used_blocks() == len(keep)
    return a


def counts(a: BlockAllocator) -> tuple[int, int, int]:
    return a.get_num_free_blocks(), a.get_num_used_blocks(), a.get_num_mapped_slots()


# ---- construction and counts ----


@pytest.mark.parametrize(("blocks_per_slot", "max_slots"), [(0, 4), (4, 0), (-1, 4), (4, -2)])
def test_geometry_must_be_positive(blocks_per_slot: int, max_slots: int):
    with pytest.raises(ValueError, match="must be positive"):
        BlockAllocator(blocks_per_slot, max_slots)


def test_new_allocator_is_empty():
    a = allocator(4, 8)
    assert a.max_blocks == 32
    assert counts(a) == (0, 0, 0)
    assert a.get_empty_slots() == []
    assert a.get_unmapped_slots(3) == [0, 1, 2]
    assert not any(a.is_mapped(s) for s in range(8))


# ---- alloc ----


def test_alloc_from_an_empty_allocator_returns_nothing():
    a = allocator()
    assert a.alloc(1) == []
    assert a.alloc(5) == []
    assert counts(a) == (0, 0, 0)


@pytest.mark.parametrize("n", [0, -1])
def test_alloc_of_nothing_returns_nothing(n: int):
    a = allocator(mapped=(0,))
    assert a.alloc(n) == []
    assert counts(a) == (4, 0, 1)


def test_alloc_from_one_slot_hands_out_lowest_ids_first():
    a = allocator(4, 4, (0,))
    assert counts(a) == (4, 0, 1)
    assert a.alloc(3) == [0, 1, 2]
    assert counts(a) == (1, 3, 1)
    assert a.alloc(1) == [3]
    assert a.alloc(1) == []
    assert counts(a) == (0, 4, 1)


def test_alloc_more_than_free_returns_only_the_free_ones():
    a = allocator(4, 4, (0, 1))
    assert a.alloc(3) == [0, 1, 2]
    assert a.alloc(10) == [3, 4, 5, 6, 7]
    assert counts(a) == (0, 8, 2)
    assert a.alloc(10) == []


def test_alloc_more_than_free_on_a_fragmented_allocator_returns_every_free_id_fullest_first():
    a = shaped({0: [0], 1: [4, 5, 7], 2: [9]})
    assert a.alloc(100) == [6, 1, 2, 3, 8, 10, 11]  # slot 1, then slots 0 and 2 (1 in use each)
    assert counts(a) == (0, 12, 3)


def test_alloc_takes_the_lowest_slot_when_all_are_empty():
    a = allocator(4, 4)
    a.add_slot(2)
    a.add_slot(1)
    a.add_slot(3)
    assert a.alloc(1) == [4]
    assert a.alloc(5) == [5, 6, 7, 8, 9]


def test_alloc_prefers_a_partially_used_slot_over_an_empty_one():
    a = shaped({0: [], 1: [5], 2: []})
    assert a.alloc(1) == [4]
    assert a.alloc(2) == [6, 7]  # slot 1 fills up before any empty slot is touched
    assert a.alloc(1) == [0]


def test_alloc_prefers_the_fullest_slot_over_less_full_ones():
    # Slot 0: 1 in use; slot 1: 3 in use; slot 2: 2 in use; slot 3: empty.
    a = shaped({0: [0], 1: [4, 5, 7], 2: [9, 10], 3: []})
    assert counts(a) == (10, 6, 4)
    assert a.alloc(1) == [6]  # slot 1, the fullest
    assert a.alloc(1) == [8]  # slot 2 (2 in use) before slot 0 (1 in use)
    assert a.alloc(2) == [11, 1]  # slot 2 fills up, then slot 0
    assert a.alloc(3) == [2, 3, 12]  # slot 0 fills up, then the empty slot 3
    assert counts(a) == (3, 13, 4)


def test_alloc_takes_the_lowest_slot_among_equally_full_ones():
    a = shaped({0: [], 1: [4, 6], 2: [], 3: [13, 15]})
    assert a.alloc(1) == [5]
    assert a.alloc(1) == [7]  # slot 1 was the lowest with 2 in use; now it is the fullest
    assert a.alloc(2) == [12, 14]
    assert a.alloc(1) == [0]


def test_alloc_takes_the_lowest_ids_within_a_slot():
    a = shaped({0: [1, 3], 1: [4, 5, 6, 7]})
    assert a.alloc(1) == [0]
    assert a.alloc(1) == [2]
    a.free([3, 1, 0])
    assert a.alloc(2) == [0, 1]
    assert a.alloc(2) == [3]


def test_alloc_across_slots_returns_ids_slot_by_slot_ascending_within_each():
    a = shaped({0: [0, 2], 1: [4, 5, 6], 2: [], 3: [13]}, 4, 4)
    # Fullest first: slot 1 (3 in use), slot 0 (2), slot 3 (1), slot 2 (0).
    assert a.alloc(9) == [7, 1, 3, 12, 14, 15, 8, 9, 10]


def test_alloc_spanning_many_empty_slots():
    a = allocator(4, 8, tuple(range(8)))
    assert a.alloc(10) == list(range(10))
    assert a.alloc(10) == list(range(10, 20))
    assert a.get_empty_slots() == [7, 6, 5]


def test_one_block_per_slot():
    a = allocator(1, 4, (3, 1))
    assert a.alloc(1) == [1]
    assert a.alloc(5) == [3]
    assert a.free([3, 1]) == [1, 3]


# ---- free ----


def test_free_takes_any_sequence_of_ids():
    a = allocator(4, 4, (0, 1))
    assert a.alloc(8) == list(range(8))
    assert a.free((1, 0)) == []
    assert a.free(np.array([2, 3, 5], dtype=np.int64)) == [0]
    assert a.free(range(6, 8)) == []
    assert counts(a) == (7, 1, 2)
    assert a.alloc(8) == [5, 6, 7, 0, 1, 2, 3]
    assert a.free(np.array([3, 2, 1, 0, 7, 6, 5, 4])) == [0, 1]


def test_freed_ids_are_reused_lowest_first():
    a = allocator(4, 4, (0,))
    assert a.alloc(4) == [0, 1, 2, 3]
    assert a.free([3]) == []
    assert a.free([1]) == []
    assert a.alloc(1) == [1]
    assert a.alloc(1) == [3]


def test_freed_ids_are_reused_lowest_first_whatever_the_free_order():
    a = allocator(8, 2, (0,))
    assert a.alloc(8) == list(range(8))
    a.free([6, 2, 4])
    a.free([5])
    a.free([1, 7])
    assert a.alloc(3) == [1, 2, 4]
    assert a.alloc(3) == [5, 6, 7]


def test_free_of_a_descending_run():
    """vLLM frees a request's blocks tail first."""
    a = allocator(4, 4, (0, 1))
    assert a.alloc(6) == [0, 1, 2, 3, 4, 5]
    assert a.free([3, 2, 1]) == []
    assert a.alloc(3) == [6, 7, 1]  # slot 1 (2 in use) fills up before slot 0 (1 in use)
    assert a.free([7, 6, 5, 4]) == [1]
    assert a.free([1, 0]) == [0]
    assert counts(a) == (8, 0, 2)


def test_a_descending_run_with_a_free_block_is_refused():
    a = allocator(4, 4, (0,))
    assert a.alloc(4) == [0, 1, 2, 3]
    a.free([1])
    with pytest.raises(ValueError, match=r"^block 1 is not in use \(freed twice\?\)$"):
        a.free([3, 2, 1, 0])
    assert counts(a) == (1, 3, 1)
    assert a.free([3, 2, 0]) == [0]


def test_free_returns_the_slot_that_became_empty():
    a = allocator(4, 4, (0,))
    assert a.alloc(3) == [0, 1, 2]
    assert a.free([1]) == []
    assert a.free([0]) == []
    assert a.free([2]) == [0]
    assert counts(a) == (4, 0, 1)
    assert a.get_empty_slots() == [0]


def test_free_returns_every_slot_that_became_empty_lowest_first():
    a = allocator(4, 4, (0, 1, 2, 3))
    assert a.alloc(14) == list(range(14))
    # Slot 3 keeps 12 and 13 in use; slots 2, 0 and 1 empty out.
    assert a.free([9, 8, 4, 5, 6, 7, 11, 10, 3, 2, 1, 0, 12]) == [0, 1, 2]
    assert a.get_empty_slots() == [2, 1, 0]
    assert counts(a) == (15, 1, 4)


def test_free_of_an_empty_batch_is_a_no_op():
    a = allocator(4, 4, (0,))
    a.alloc(2)
    assert a.free([]) == []
    assert counts(a) == (2, 2, 1)


def test_free_everything_then_alloc_again_restarts_from_the_lowest_ids():
    a = allocator(4, 4, (0, 1, 2))
    ids = a.alloc(12)
    random.Random(1).shuffle(ids)
    assert a.free(ids) == [0, 1, 2]
    assert a.alloc(5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("block", [-1, -5, -(10**9), 16, 17, 10**9])
def test_free_of_an_out_of_range_block_is_refused(block: int):
    a = allocator(4, 4, (0, 1, 2, 3))
    a.alloc(16)
    with pytest.raises(ValueError, match=rf"^block {block} is not on a mapped slot$"):
        a.free([block])
    assert counts(a) == (0, 16, 4)


def test_free_of_a_block_on_an_unmapped_slot_is_refused():
    a = allocator(4, 4, (0, 2))
    a.alloc(8)
    with pytest.raises(ValueError, match=r"^block 5 is not on a mapped slot$"):
        a.free([5])
    assert counts(a) == (0, 8, 2)


def test_double_free_is_refused():
    a = allocator(4, 4, (0,))
    assert a.alloc(2) == [0, 1]
    a.free([1])
    with pytest.raises(ValueError, match=r"^block 1 is not in use \(freed twice\?\)$"):
        a.free([1])
    assert counts(a) == (3, 1, 1)


def test_free_of_a_block_never_handed_out_is_refused():
    a = allocator(4, 4, (0,))
    assert a.alloc(2) == [0, 1]
    with pytest.raises(ValueError, match=r"^block 3 is not in use \(freed twice\?\)$"):
        a.free([3])
    assert counts(a) == (2, 2, 1)


def test_the_same_block_twice_in_one_batch_is_refused():
    a = allocator(4, 4, (0,))
    assert a.alloc(3) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"^block 1 is not in use \(freed twice\?\)$"):
        a.free([1, 2, 1])
    assert counts(a) == (1, 3, 1)
    assert a.free([0, 1, 2]) == [0]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (-1, r"^block -1 is not on a mapped slot$"),
        (8, r"^block 8 is not on a mapped slot$"),  # slot 2 is not mapped
        (64, r"^block 64 is not on a mapped slot$"),
        (7, r"^block 7 is not in use \(freed twice\?\)$"),
        (4, r"^block 4 is not in use \(freed twice\?\)$"),  # also in the batch, once more
    ],
)
def test_nothing_is_freed_when_one_block_of_a_batch_is_bad(bad: int, message: str):
    a = allocator(4, 4, (0, 1))
    assert a.alloc(7) == [0, 1, 2, 3, 4, 5, 6]
    before = counts(a)
    with pytest.raises(ValueError, match=message):
        a.free([0, 1, 2, 3, 4, bad, 5])
    assert counts(a) == before
    assert a.get_empty_slots() == []
    assert a.alloc(2) == [7]  # the good blocks of the refused batch are still in use
    assert a.free([5, 4, 3, 2, 1, 0, 6, 7]) == [0, 1]
    assert counts(a) == (8, 0, 2)


def test_the_first_bad_block_of_a_batch_is_named():
    a = allocator(4, 4, (0,))
    a.alloc(4)
    a.free([2])
    with pytest.raises(ValueError, match=r"^block 2 is not in use"):
        a.free([0, 2, 99])
    with pytest.raises(ValueError, match=r"^block 99 is not on a mapped slot$"):
        a.free([0, 99, 2])
    assert counts(a) == (1, 3, 1)


# ---- slots ----


def test_add_slot_makes_its_blocks_free():
    a = allocator(4, 4)
    a.add_slot(1)
    assert a.is_mapped(1) and not a.is_mapped(0)
    assert counts(a) == (4, 0, 1)
    assert a.alloc(4) == [4, 5, 6, 7]


def test_add_slot_twice_is_refused():
    a = allocator(4, 4, (0,))
    a.alloc(1)
    with pytest.raises(ValueError, match=r"^slot 0 is already mapped$"):
        a.add_slot(0)
    assert counts(a) == (3, 1, 1)
    assert a.alloc(4) == [1, 2, 3]


@pytest.mark.parametrize("slot", [-1, 4, 100])
def test_add_slot_out_of_range_is_refused(slot: int):
    a = allocator(4, 4)
    with pytest.raises(ValueError, match=rf"^slot {slot} is out of range \(0\.\.3\)$"):
        a.add_slot(slot)
    assert counts(a) == (0, 0, 0)
    assert a.get_unmapped_slots(4) == [0, 1, 2, 3]


def test_remove_slot_of_an_empty_slot():
    a = allocator(4, 4, (0, 1))
    assert a.alloc(5) == [0, 1, 2, 3, 4]
    a.free([4])
    a.remove_slot(1)
    assert not a.is_mapped(1)
    assert counts(a) == (0, 4, 1)
    assert a.alloc(1) == []
    assert a.get_unmapped_slots(2) == [1, 2]


def test_remove_slot_with_blocks_in_use_is_refused():
    a = allocator(4, 4, (0,))
    a.alloc(2)
    with pytest.raises(ValueError, match=r"^slot 0 still has 2 blocks in use$"):
        a.remove_slot(0)
    assert a.is_mapped(0)
    assert counts(a) == (2, 2, 1)


def test_remove_slot_of_an_unmapped_slot_is_refused():
    a = allocator(4, 4, (0,))
    with pytest.raises(ValueError, match=r"^slot 1 is not mapped$"):
        a.remove_slot(1)
    a.remove_slot(0)
    with pytest.raises(ValueError, match=r"^slot 0 is not mapped$"):
        a.remove_slot(0)
    assert counts(a) == (0, 0, 0)


@pytest.mark.parametrize("slot", [-1, 4])
def test_remove_slot_out_of_range_is_refused(slot: int):
    a = allocator(4, 4, (0, 3))
    with pytest.raises(ValueError, match=rf"^slot {slot} is out of range \(0\.\.3\)$"):
        a.remove_slot(slot)
    assert counts(a) == (8, 0, 2)


def test_a_removed_slot_can_be_mapped_again_with_all_its_blocks_free():
    a = allocator(4, 4, (0, 1))
    assert a.alloc(6) == [0, 1, 2, 3, 4, 5]
    a.free([4, 5])
    a.remove_slot(1)
    a.add_slot(1)
    assert a.alloc(4) == [4, 5, 6, 7]


def test_blocks_of_a_removed_slot_are_never_handed_out():
    a = allocator(4, 4, (0, 1, 2))
    a.remove_slot(0)
    assert a.alloc(100) == [4, 5, 6, 7, 8, 9, 10, 11]


def test_get_empty_slots_highest_first():
    a = allocator(4, 6, (4, 0, 2, 1, 5))
    assert a.get_empty_slots() == [5, 4, 2, 1, 0]
    assert a.alloc(5) == [0, 1, 2, 3, 4]  # slot 0 full, slot 1 partly used
    assert a.get_empty_slots() == [5, 4, 2]
    a.free([4])
    assert a.get_empty_slots() == [5, 4, 2, 1]
    a.remove_slot(4)
    assert a.get_empty_slots() == [5, 2, 1]


def test_get_unmapped_slots_lowest_first():
    a = allocator(4, 6, (0, 2, 3))
    assert a.get_unmapped_slots(1) == [1]
    assert a.get_unmapped_slots(2) == [1, 4]
    assert a.get_unmapped_slots(10) == [1, 4, 5]
    assert a.get_unmapped_slots(0) == []
    for slot in (1, 4, 5):
        a.add_slot(slot)
    assert a.get_unmapped_slots(3) == []


# ---- take: blocks the caller chooses ----


def test_take_marks_the_chosen_blocks_in_use():
    a = allocator(4, 4, (0, 1))
    a.take([6, 1, 4])
    assert counts(a) == (5, 3, 2)
    assert a.get_used_blocks(0) == [1] and a.get_used_blocks(1) == [4, 6]
    assert a.alloc(3) == [5, 7, 0]  # the fuller slot 1 first, then slot 0
    a.free([1, 4, 6])
    assert a.get_used_blocks(1) == [5, 7]


def test_take_of_a_whole_slot_leaves_it_full_and_out_of_every_bucket():
    a = allocator(4, 4, (0, 1))
    a.take([4, 5, 6, 7])
    assert a.get_empty_slots() == [0]
    assert a.alloc(8) == [0, 1, 2, 3]
    assert a.free([7, 4, 5, 6]) == [1]


def test_take_in_batches_side_by_side_in_the_free_ids_or_not():
    a = allocator(8, 2, (0, 1))
    a.take([2, 5])  # in use: 2 and 5
    a.take([3, 4, 6, 1])  # side by side among slot 0's free ids (0, 1, 3, 4, 6, 7): one slice
    assert a.get_used_blocks(0) == [1, 2, 3, 4, 5, 6]
    a.take([15, 9, 12])  # not side by side among slot 1's free ids: the general path
    assert a.get_used_blocks(1) == [9, 12, 15]
    assert counts(a) == (7, 9, 2)
    assert a.alloc(3) == [0, 7, 8]  # the fuller slot 0 first
    with pytest.raises(ValueError, match="block 10 is given twice"):
        a.take([10, 10])
    with pytest.raises(ValueError, match="block 9 is already in use"):
        a.take([9, 10])
    assert counts(a) == (4, 12, 2)


def test_take_of_nothing_is_a_no_op():
    a = allocator(4, 4, (0,))
    a.take([])
    assert counts(a) == (4, 0, 1)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([1, 16], "block 16 is out of range"),
        ([-1, 2], "block -1 is out of range"),
        ([1, 9], "block 9 is not on a mapped slot"),
        ([2, 3, 2], "block 2 is given twice"),
        ([0, 5], "block 5 is already in use"),
    ],
)
def test_take_refuses_a_bad_batch_and_takes_nothing(ids: list[int], message: str):
    a = allocator(4, 4, (0, 1))
    a.take([5])
    before = counts(a)
    drained_before = copy.deepcopy(a).alloc(a.max_blocks)
    with pytest.raises(ValueError, match=message):
        a.take(ids)
    assert counts(a) == before
    assert copy.deepcopy(a).alloc(a.max_blocks) == drained_before


# ---- a reference model, and model-based fuzzing ----


class Model:
    """The documented policy, written the obvious way (and slowly)."""

    def __init__(self, blocks_per_slot: int, max_slots: int) -> None:
        self.bps = blocks_per_slot
        self.max_slots = max_slots
        self.mapped: set[int] = set()
        self.in_use: set[int] = set()

    def blocks(self, slot: int) -> range:
        return range(slot * self.bps, (slot + 1) * self.bps)

    def used(self, slot: int) -> int:
        return sum(b in self.in_use for b in self.blocks(slot))

    def free_ids(self) -> list[int]:
        """Every free id, in the order one big alloc must hand them out."""
        order = sorted(self.mapped, key=lambda s: (-self.used(s), s))
        return [b for s in order for b in self.blocks(s) if b not in self.in_use]

    def alloc(self, n: int) -> list[int]:
        out = self.free_ids()[: max(n, 0)]
        self.in_use.update(out)
        return out

    def take(self, ids: list[int]) -> None:
        self.in_use.update(ids)

    def free(self, ids: list[int]) -> list[int]:
        slots = {b // self.bps for b in ids}
        self.in_use.difference_update(ids)
        return sorted(s for s in slots if self.used(s) == 0)


def check_against_model(a: BlockAllocator, model: Model) -> None:
    """Every property that must hold between operations, checked through the public API and internals."""
    bps = model.bps
    mapped_blocks = {b for s in model.mapped for b in model.blocks(s)}
    # Counts.
    assert a.get_num_mapped_slots() == len(model.mapped)
    assert a.get_num_used_blocks() == len(model.in_use)
    assert a.get_num_free_blocks() + a.get_num_used_blocks() == len(model.mapped) * bps
    assert [a.is_mapped(s) for s in range(model.max_slots)] == [s in model.mapped for s in range(model.max_slots)]
    # Every handed-out block lies on a mapped slot.
    assert model.in_use <= mapped_blocks
    # The free ids, in the order they would be handed out: drain a copy.
    drained = copy.deepcopy(a).alloc(a.max_blocks)
    assert len(drained) == len(set(drained)) == a.get_num_free_blocks()
    assert set(drained) == mapped_blocks - model.in_use  # free = complement of used among mapped slots
    assert drained == model.free_ids()
    per_slot_free = {s: sum(b // bps == s for b in drained) for s in model.mapped}
    assert sum(per_slot_free.values()) == a.get_num_free_blocks()
    assert all(per_slot_free[s] + model.used(s) == bps for s in model.mapped)
    # Packing: in that order no block of an empty slot comes before the last free block of a partly used slot.
    partly = [i for i, b in enumerate(drained) if 0 < model.used(b // bps) < bps]
    empty = [i for i, b in enumerate(drained) if model.used(b // bps) == 0]
    assert not partly or not empty or max(partly) < min(empty)
    # Slot queries.
    assert a.get_empty_slots() == sorted((s for s in model.mapped if model.used(s) == 0), reverse=True)
    unmapped = [s for s in range(model.max_slots) if s not in model.mapped]
    assert a.get_unmapped_slots(model.max_slots) == unmapped
    assert a.get_unmapped_slots(1) == unmapped[:1]
    # The invariants of the C state (kvmem/_block_allocator.c's design note), checked by the allocator itself.
    a._check()


class AllocatorMachine(RuleBasedStateMachine):
    """Random adds, removes, allocs, frees (good and bad) against the model, checked after every step."""

    @initialize(blocks_per_slot=st.integers(1, 5), max_slots=st.integers(1, 6), mapped=st.sets(st.integers(0, 5)))
    def setup(self, blocks_per_slot: int, max_slots: int, mapped: set[int]) -> None:
        self.a = BlockAllocator(blocks_per_slot, max_slots)
        self.model = Model(blocks_per_slot, max_slots)
        self.live: list[list[int]] = []  # batches handed out and not yet freed
        for slot in sorted(mapped):
            if slot < max_slots:
                self.a.add_slot(slot)
                self.model.mapped.add(slot)

    def slot(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, self.model.max_slots - 1), label="slot")

    @rule(data=st.data())
    def add_slot(self, data: st.DataObject) -> None:
        slot = self.slot(data)
        if slot in self.model.mapped:
            with pytest.raises(ValueError, match="already mapped"):
                self.a.add_slot(slot)
        else:
            self.a.add_slot(slot)
            self.model.mapped.add(slot)

    @rule(data=st.data())
    def remove_slot(self, data: st.DataObject) -> None:
        slot = self.slot(data)
        if slot not in self.model.mapped:
            with pytest.raises(ValueError, match="is not mapped"):
                self.a.remove_slot(slot)
        elif self.model.used(slot):
            with pytest.raises(ValueError, match=f"still has {self.model.used(slot)} blocks in use"):
                self.a.remove_slot(slot)
        else:
            self.a.remove_slot(slot)
            self.model.mapped.discard(slot)

    @rule(n=st.integers(-1, 12))
    def alloc(self, n: int) -> None:
        bps = self.model.bps
        used_before = {s: self.model.used(s) for s in self.model.mapped}
        in_use_before = set(self.model.in_use)
        out = self.a.alloc(n)
        assert out == self.model.alloc(n)
        assert len(out) == len(set(out)) == min(max(n, 0), len(out) + self.a.get_num_free_blocks())
        assert not in_use_before.intersection(out)  # never handed out twice
        assert all(b // bps in used_before for b in out)  # only from mapped slots
        if any(used_before[b // bps] == 0 for b in out):
            # It took from an empty slot: no slot that was partly used may still have a free block.
            assert all(self.model.used(s) == bps for s, u in used_before.items() if 0 < u < bps)
        if out:
            self.live.append(out)

    @rule(data=st.data())
    def take(self, data: st.DataObject) -> None:
        model = self.model
        free = sorted({b for s in model.mapped for b in model.blocks(s)} - model.in_use)
        ids = data.draw(st.lists(st.sampled_from(free), unique=True) if free else st.just([]), label="ids")
        self.a.take(list(ids))
        model.take(list(ids))
        if ids:
            self.live.append(list(ids))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free_batch(self, data: st.DataObject) -> None:
        batch = self.live.pop(data.draw(st.integers(0, len(self.live) - 1), label="batch"))
        keep = data.draw(st.lists(st.booleans(), min_size=len(batch), max_size=len(batch)), label="keep")
        ids = data.draw(st.permutations([b for b, k in zip(batch, keep, strict=True) if not k]), label="ids")
        if len(ids) < len(batch):
            self.live.append([b for b in batch if b not in ids])
        assert self.a.free(list(ids)) == self.model.free(list(ids))

    @rule(data=st.data())
    def free_bad(self, data: st.DataObject) -> None:
        model = self.model
        good = sorted(model.in_use)
        ids = data.draw(st.lists(st.sampled_from(good), unique=True) if good else st.just([]), label="good")
        bad_choices = [-1, model.bps * model.max_slots, model.bps * model.max_slots + 7]
        bad_choices += [b for b in range(model.bps * model.max_slots) if b not in model.in_use]
        bad_choices += ids  # a duplicate inside the batch
        bad = data.draw(st.sampled_from(bad_choices), label="bad")
        ids.insert(data.draw(st.integers(0, len(ids)), label="at"), bad)
        before = counts(self.a)
        drained_before = copy.deepcopy(self.a).alloc(self.a.max_blocks)
        with pytest.raises(ValueError, match=r"is not on a mapped slot|is not in use"):
            self.a.free(ids)
        assert counts(self.a) == before
        assert copy.deepcopy(self.a).alloc(self.a.max_blocks) == drained_before

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "a"):
            check_against_model(self.a, self.model)


AllocatorMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorMachine = AllocatorMachine.TestCase


@pytest.mark.parametrize("seed", range(3))
def test_random_workload_at_a_realistic_scale_matches_the_model(seed: int):
    """Many slots of 16 blocks, batches of 1 to 40, slots mapped and unmapped as they empty and fill."""
    rng = random.Random(seed)
    a, model = BlockAllocator(16, 24), Model(16, 24)
    live: list[list[int]] = []
    for step in range(600):
        op = rng.random()
        if op < 0.1:
            slots = a.get_unmapped_slots(rng.randint(1, 3))
            for s in slots:
                a.add_slot(s)
                model.mapped.add(s)
        elif op < 0.15 and a.get_empty_slots():
            s = rng.choice(a.get_empty_slots())
            a.remove_slot(s)
            model.mapped.discard(s)
        elif op < 0.6:
            n = rng.choice([1, 1, 2, 3, 8, 16, 17, 40])
            out = a.alloc(n)
            assert out == model.alloc(n)
            if out:
                live.append(out)
        elif live:
            batch = live.pop(rng.randrange(len(live)))
            rng.shuffle(batch)
            assert a.free(batch) == model.free(batch)
        if step % 20 == 0:
            check_against_model(a, model)
    check_against_model(a, model)
