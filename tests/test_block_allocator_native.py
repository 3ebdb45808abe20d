"""The C `BlockAllocator` beyond the policy (tests/test_block_allocator.py states that id by id):
geometries that need several bit words per slot and summary levels, bad input of every kind, the
gate and the growth wake-up the cache's hot path relies on, and calls from several threads at once.
"""

from __future__ import annotations

import copy
import random
import sys
import threading

import numpy as np
import pytest

from kvmem.block_allocator import BlockAllocator
from tests.test_block_allocator import Model, check_against_model


def mapped(blocks_per_slot: int, max_slots: int, slots) -> BlockAllocator:
    a = BlockAllocator(blocks_per_slot, max_slots)
    for slot in slots:
        a.add_slot(slot)
    return a


# ---- geometries: several words per slot, several summary levels ----


@pytest.mark.parametrize(
    ("blocks_per_slot", "max_slots", "slots"),
    [
        (64, 4, (0, 1, 2, 3)),  # one word per slot, exactly full
        (70, 5, (0, 2, 4)),  # two words per slot, the second partly used
        (130, 3, (0, 1, 2)),  # three words per slot
        (3, 4200, (0, 63, 64, 65, 4095, 4096, 4199)),  # three summary levels over the slots
        (65, 70, (1, 63, 64, 69)),  # 65 buckets: two levels in the bucket mask
    ],
)
@pytest.mark.parametrize("seed", range(2))
def test_random_workload_on_large_geometries_matches_the_model(blocks_per_slot, max_slots, slots, seed):
    rng = random.Random(seed)
    a, model = mapped(blocks_per_slot, max_slots, slots), Model(blocks_per_slot, max_slots)
    model.mapped.update(slots)
    live: list[list[int]] = []
    sizes = [1, 2, blocks_per_slot - 1, blocks_per_slot, blocks_per_slot + 1, 2 * blocks_per_slot + 3]
    for step in range(150):
        op = rng.random()
        if op < 0.45:
            n = rng.choice(sizes)
            out = a.alloc(n)
            assert out == model.alloc(n)
            if out:
                live.append(out)
        elif op < 0.55:
            free = sorted({b for s in model.mapped for b in model.blocks(s)} - model.in_use)
            ids = rng.sample(free, min(len(free), rng.choice([1, 5, blocks_per_slot])))
            a.take(ids)
            model.take(ids)
            if ids:
                live.append(ids)
        elif op < 0.6 and a.get_empty_slots():
            slot = rng.choice(a.get_empty_slots())
            a.remove_slot(slot)
            model.mapped.discard(slot)
        elif op < 0.65 and len(model.mapped) < max_slots:
            slot = rng.choice([s for s in range(max_slots) if s not in model.mapped])
            a.add_slot(slot)
            model.mapped.add(slot)
        elif live:
            batch = live.pop(rng.randrange(len(live)))
            order = rng.choice(["as is", "reversed", "shuffled"])
            if order == "reversed":
                batch.reverse()
            elif order == "shuffled":
                rng.shuffle(batch)
            assert a.free(batch) == model.free(batch)
        if step % 25 == 0:
            check_against_model(a, model)
    check_against_model(a, model)


def test_runs_across_slots_are_freed_and_taken_whole():
    a = mapped(64, 8, range(8))
    run = a.alloc(200)  # slots 0-2 full, 8 blocks of slot 3
    assert run == list(range(200))
    assert a.free(run[::-1]) == [0, 1, 2, 3]  # one descending run over four slots
    a.take(range(60, 140))  # one ascending run over three slots
    assert a.get_slot_usage()[:3] == [(1, 64), (2, 12), (0, 4)]
    with pytest.raises(ValueError, match=r"^block 139 is already in use$"):
        a.take(range(139, 150))
    with pytest.raises(ValueError, match=r"^block 140 is not in use \(freed twice\?\)$"):
        a.free(range(130, 141))
    assert a.counts() == (512 - 80, 80, 8, 3)
    a._check()


# ---- bad input ----


@pytest.mark.parametrize("block", [10**30, -(10**30), 2**63, -(2**63) - 1, 2**64])
def test_ids_beyond_a_machine_word_are_refused_by_name(block: int):
    a = mapped(4, 4, (0,))
    a.alloc(2)
    with pytest.raises(ValueError, match=rf"^block {block} is not on a mapped slot$"):
        a.free([0, block])
    with pytest.raises(ValueError, match=rf"^block {block} is out of range \(0\.\.15\)$"):
        a.take([2, block])
    assert a.counts() == (2, 2, 1, 1)
    a._check()


def test_the_lowest_out_of_range_id_of_a_take_is_named_first():
    a = mapped(4, 4, (0,))
    with pytest.raises(ValueError, match=r"^block -5 is out of range"):
        a.take([10**30, 2, -5])
    with pytest.raises(ValueError, match=rf"^block {-(10**30)} is out of range"):
        a.take([10**30, -5, -(10**30)])


@pytest.mark.parametrize("slot", [-1, 4, 10**30, -(10**30)])
@pytest.mark.parametrize("method", ["is_mapped", "get_used_blocks", "add_slot", "remove_slot"])
def test_a_slot_out_of_range_is_a_value_error(method: str, slot: int):
    a = mapped(4, 4, (0,))
    with pytest.raises(ValueError, match=rf"^slot {slot} is out of range \(0\.\.3\)$"):
        getattr(a, method)(slot)
    assert a.counts() == (4, 0, 1, 0)


def test_ids_of_any_integer_kind_are_taken_and_named_as_given():
    a = mapped(4, 4, (0, 1))
    a.take(np.array([0, 1, 2], dtype=np.int32))
    a.take((np.int64(5),))
    assert a.free(range(3)) == [0]
    with pytest.raises(ValueError, match=r"^block 9 is not on a mapped slot$"):
        a.free([np.int64(5), np.int64(9)])
    assert a.free([np.uint8(5)]) == [1]


@pytest.mark.parametrize("bad", [[1.0], ["1"], [None], 5, None])
def test_what_is_not_an_int_is_a_type_error_and_changes_nothing(bad):
    a = mapped(4, 4, (0,))
    a.alloc(3)
    for call in (a.free, a.take, a.try_take):
        with pytest.raises(TypeError):
            call(bad)
    with pytest.raises(TypeError):
        a.alloc("3")
    assert a.counts() == (1, 3, 1, 1)
    a._check()


def test_geometry_beyond_reason_is_refused():
    with pytest.raises(ValueError, match="more than 2\\*\\*40 blocks"):
        BlockAllocator(2**21, 2**21)
    with pytest.raises(OverflowError):
        BlockAllocator(2**70, 1)


def test_alloc_of_more_than_exists_returns_every_free_block():
    a = mapped(4, 4, (1, 2))
    assert a.alloc(10**30) == list(range(4, 12))
    assert a.alloc(10**30) == []


# ---- slots in one call, reset, counts, copies ----


def test_remove_empty_slots_removes_the_highest_first_in_one_call():
    a = mapped(4, 6, range(6))
    a.take([9])  # slot 2 in use
    assert a.remove_empty_slots(2) == [5, 4]
    assert a.remove_empty_slots(0) == []
    assert a.remove_empty_slots() == [3, 1, 0]
    assert a.counts() == (3, 1, 1, 1)
    assert a.remove_empty_slots() == []
    a._check()


def test_reset_forgets_every_slot_and_block():
    a = mapped(4, 4, (0, 3))
    a.alloc(5)
    a.reset()
    assert a.counts() == (0, 0, 0, 0)
    assert a.get_unmapped_slots(4) == [0, 1, 2, 3]
    a.add_slot(3)
    assert a.alloc(2) == [12, 13]
    a._check()


def test_a_copy_is_independent():
    a = mapped(4, 4, (0, 1))
    a.alloc(3)
    for b in (copy.copy(a), copy.deepcopy(a)):
        assert b.alloc(100) == [3, 4, 5, 6, 7]
        b._check()
    assert a.counts() == (5, 3, 2, 1)


def test_handed_out_ids_are_plain_ints_that_outlive_the_allocator():
    a = mapped(4, 4, (2,))
    ids = a.alloc(2)
    del a
    assert ids == [8, 9] and all(type(i) is int for i in ids)


# ---- the gate and the wake-up (the cache's hot path) ----


def test_alloc_exact_hands_out_all_or_nothing():
    a = mapped(4, 4, (0,))
    assert a.alloc_exact(3) == [0, 1, 2]
    assert a.alloc_exact(2) is None  # one free: nothing taken
    assert a.alloc_exact(-1) is None
    assert a.alloc_exact(10**30) is None
    assert a.alloc_exact(0) == []
    assert a.counts() == (1, 3, 1, 1)


@pytest.mark.parametrize("flag", ["paused", "closed"])
def test_the_gate_stops_alloc_exact_and_try_take_only(flag: str):
    a = mapped(4, 4, (0,))
    setattr(a, flag, True)
    assert getattr(a, flag) is True
    assert a.alloc_exact(1) is None and a.alloc_exact(0) is None
    assert a.try_take([0]) is False and a.try_take([]) is False
    assert a.try_take([99]) is False  # the gate first, whatever the ids
    assert a.counts() == (4, 0, 1, 0)
    assert a.alloc(1) == [0]  # alloc, take and free ignore it (compaction, drains)
    a.take([1])
    assert a.free([0, 1]) == [0]
    setattr(a, flag, False)
    assert a.alloc_exact(1) == [0] and a.try_take([1]) is True


def test_the_wake_is_called_once_below_the_low_watermark_until_rearmed():
    a = mapped(4, 4, (0, 1))
    calls = []
    a.set_low_watermark(5, lambda: calls.append(a.get_num_free_blocks()))  # calls back into it: no lock held
    assert a.alloc_exact(3) == [0, 1, 2] and calls == []  # 5 free: not below
    assert a.alloc_exact(1) == [3] and calls == [4]
    assert a.alloc_exact(1) == [4] and calls == [4]  # pending: not again
    assert a.wake_pending is True
    a.wake_pending = False
    assert a.alloc_exact(1) == [5] and calls == [4, 2]
    a.alloc(1)  # only alloc_exact wakes
    a.set_low_watermark(5, None)
    a.wake_pending = False
    assert a.alloc_exact(1) == [7] and calls == [4, 2]


def test_a_failing_wake_loses_no_block(monkeypatch):
    a = mapped(4, 4, (0,))
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    def wake() -> None:
        raise RuntimeError("no thread")

    a.set_low_watermark(4, wake)
    assert a.alloc_exact(1) == [0]
    assert len(unraisable) == 1 and isinstance(unraisable[0].exc_value, RuntimeError)
    assert a.counts() == (3, 1, 1, 1)
    with pytest.raises(TypeError):
        a.set_low_watermark(1, 5)


def test_the_first_take_hook_is_called_once_by_the_first_call_that_hands_out_blocks():
    a = mapped(4, 4, (0, 1))
    calls = []
    a.arm_first_take(lambda used: calls.append((used, a.get_num_used_blocks())))  # no lock held: it may call in
    assert a.alloc_exact(0) == [] and a.alloc_exact(99) is None and a.alloc(0) == []  # nothing handed out
    a.take([])
    assert a.try_take([5]) is True and calls == [(1, 1)]  # the blocks in use just after the take
    assert a.alloc_exact(2) == [4, 6] and calls == [(1, 1)]  # once: disarmed by the call (fullest slot first)
    for hand_out in (lambda: a.alloc_exact(1), lambda: a.alloc(1), lambda: a.take([3])):
        a.arm_first_take(lambda used: calls.append(used))
        hand_out()
    assert calls == [(1, 1), 4, 5, 6]
    a.arm_first_take(lambda used: calls.append(used))
    a.arm_first_take(None)  # disarmed
    a.alloc(1)
    assert calls == [(1, 1), 4, 5, 6]
    a.paused = True
    a.arm_first_take(lambda used: calls.append(used))
    assert a.alloc_exact(1) is None and a.try_take([2]) is False  # the gate hands out nothing: still armed
    a.paused = False
    assert a.try_take([2]) is True and calls == [(1, 1), 4, 5, 6, 8]
    with pytest.raises(TypeError):
        a.arm_first_take(5)


def test_a_failing_first_take_hook_loses_no_block(monkeypatch):
    a = mapped(4, 4, (0,))
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    def hook(used: int) -> None:
        raise RuntimeError("no meter")

    a.arm_first_take(hook)
    assert a.alloc(2) == [0, 1]
    assert len(unraisable) == 1 and isinstance(unraisable[0].exc_value, RuntimeError)
    assert a.counts() == (2, 2, 1, 1)
    a._check()


# ---- threads ----


def test_two_threads_allocating_and_freeing_at_once_account_for_every_block():
    """Each thread allocates and frees its own batches (alloc_exact, alloc, take, free, as the cache
    and vLLM's pool do) while a third maps and unmaps slots, as growth does: no id is ever held by
    both, and the counts are exact afterwards."""
    bps, slots = 16, 64
    a = mapped(bps, slots, range(32))
    owner = [None] * (bps * slots)  # who holds each id now (checked under the GIL by each thread)
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(me: int) -> None:
        rng = random.Random(me)
        held: list[list[int]] = []
        try:
            for step in range(3000):
                if held and (rng.random() < 0.5 or len(held) > 20):
                    batch = held.pop(rng.randrange(len(held)))
                    for b in batch:
                        assert owner[b] == me
                        owner[b] = None
                    a.free(batch if step % 2 else batch[::-1])
                    continue
                n = rng.choice([1, 3, 16, 40])
                if step % 3 == 0:
                    got = a.alloc_exact(n) or []
                elif step % 3 == 1:
                    got = a.alloc(n)
                else:
                    got = []
                    for slot, _ in a.get_slot_usage()[:2]:
                        free = sorted(set(range(slot * bps, slot * bps + bps)) - set(a.get_used_blocks(slot)))
                        try:
                            a.take(free[:n])
                            got = free[:n]
                            break
                        except ValueError:  # the other thread took one of them first, or the slot went
                            continue
                for b in got:
                    assert owner[b] is None, f"block {b} handed to {me} while {owner[b]} holds it"
                    owner[b] = me
                if got:
                    held.append(got)
            for batch in held:
                for b in batch:
                    owner[b] = None
                a.free(batch)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    def grower() -> None:
        rng = random.Random(7)
        try:
            while not stop.is_set():
                if rng.random() < 0.5:
                    for slot in a.get_unmapped_slots(2):
                        a.add_slot(slot)
                else:
                    a.remove_empty_slots(rng.randint(1, 3))
        except BaseException as e:
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in (1, 2)]
        growth = threading.Thread(target=grower)
        for t in [*threads, growth]:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        growth.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[0]
    free, used, mapped_slots, busy = a.counts()
    assert (used, busy) == (0, 0)
    assert free == mapped_slots * bps and free == a.get_num_free_blocks()
    assert sum(a.is_mapped(s) for s in range(slots)) == mapped_slots
    a._check()
