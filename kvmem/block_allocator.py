"""A page-aware block allocator: which KV blocks are free, on which mapped page slots.

The KV cache is cut into page *slots*; slot `s` holds blocks ``s * blocks_per_slot`` to
``(s + 1) * blocks_per_slot - 1`` (in every layer at once, since a growth unit maps the same slot
in every layer's K and V). A slot is usable only while it is mapped.

Allocation is page-aware: blocks come from the fullest mapped slots first (lowest slot first among
equals, lowest block id first within a slot), so allocations pack into as few slots as possible and
whole slots empty out as requests finish, ready to be unmapped and given back. This is the whole
point of an elastic cache; a plain free list scatters live blocks over every page.

Invariants:
- a block id is handed out at most once until freed, and only from a mapped slot;
- ``used[s] + len(free_in[s]) == blocks_per_slot`` for every mapped slot `s`;
- slot `s` is in ``by_used[used[s]]`` iff it is mapped and not full (a full slot is never
  allocated from, so it is in no bucket).

Kept for speed, so that alloc and free do a few C-level list operations (slices, bisection, sort)
per slot they touch rather than Python work per block:
- ``free_in[s]`` is sorted ascending: the lowest free ids are a slice at its front, and a block on
  a mapped slot is in use iff it is not in ``free_in[s]`` (no per-block in-use flags to keep);
- ``by_used[u]`` (``u < blocks_per_slot``) is a list sorted ascending: its first slot is the
  lowest;
- bit `u` of ``bucket_mask`` is set iff ``by_used[u]`` is not empty:
  the fullest non-full slots are in ``by_used[bucket_mask.bit_length() - 1]``;
- ``ids_of[s]`` lists every block id of slot `s` while it is mapped (empty otherwise): a batch
  equal to a slice of it is a run of consecutive ids, checked with one bisection of ``free_in[s]``.

The common case (a batch of consecutive ids on one slot, as alloc hands them out in a packed
cache) costs a fixed amount of Python work whatever its size; a batch spread over many slots costs
Python work per slot it touches.

This class does no locking and no I/O: `ElasticKVCache` holds the lock around it.
"""

from __future__ import annotations

from bisect import bisect_left, insort


class BlockAllocator:
    """See the module docstring.

    Args:
        blocks_per_slot: Blocks in one page slot.
        max_slots: Page slots in the virtual capacity.
    """

    def __init__(self, blocks_per_slot: int, max_slots: int):
        if blocks_per_slot < 1 or max_slots < 1:
            raise ValueError(f"blocks_per_slot={blocks_per_slot} and max_slots={max_slots} must be positive")
        self.blocks_per_slot = blocks_per_slot
        self.max_slots = max_slots
        self.max_blocks = blocks_per_slot * max_slots
        self._mapped = [False] * max_slots
        self._used = [0] * max_slots
        # Free block ids of each mapped slot, ascending.
        self._free_in: list[list[int]] = [[] for _ in range(max_slots)]
        # All block ids of each mapped slot, ascending (empty while the slot is not mapped).
        self._ids_of: list[list[int]] = [[] for _ in range(max_slots)]
        # Mapped, non-full slots by how many blocks they have in use (0 .. blocks_per_slot - 1),
        # each list ascending.
        self._by_used: list[list[int]] = [[] for _ in range(blocks_per_slot)]
        # Bit u set iff _by_used[u] is not empty, for u < blocks_per_slot.
        self._bucket_mask = 0
        self._num_free = 0
        self._num_mapped = 0

    # ---- counts (no syscalls, no locks) ----

    def get_num_free_blocks(self) -> int:
        return self._num_free

    def get_num_used_blocks(self) -> int:
        return self._num_mapped * self.blocks_per_slot - self._num_free

    def get_num_mapped_slots(self) -> int:
        return self._num_mapped

    def is_mapped(self, slot: int) -> bool:
        return self._mapped[slot]

    def get_empty_slots(self) -> list[int]:
        """Mapped slots with no block in use, highest first (the best ones to give back)."""
        return self._by_used[0][::-1]

    def get_slot_usage(self) -> list[tuple[int, int]]:
        """(slot, blocks in use) of every mapped slot, fullest first, lowest slot first among equals:
        the order `alloc` fills them in. (Python work per slot: for compaction, not the hot path.)"""
        mapped = [(slot, self._used[slot]) for slot, is_mapped in enumerate(self._mapped) if is_mapped]
        return sorted(mapped, key=lambda item: (-item[1], item[0]))

    def get_used_blocks(self, slot: int) -> list[int]:
        """The block ids in use on mapped `slot`, ascending."""
        self._check_slot(slot)
        free = set(self._free_in[slot])
        return [block for block in self._ids_of[slot] if block not in free]

    def get_unmapped_slots(self, n: int) -> list[int]:
        """The `n` lowest slots not mapped (where growth should map next), or fewer."""
        out: list[int] = []
        if n <= 0:
            return out
        for slot, mapped in enumerate(self._mapped):
            if not mapped:
                out.append(slot)
                if len(out) == n:
                    break
        return out

    # ---- slots ----

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is out of range (0..{self.max_slots - 1})")

    def add_slot(self, slot: int) -> None:
        """Slot `slot` has just been mapped: its blocks become free."""
        self._check_slot(slot)
        if self._mapped[slot]:
            raise ValueError(f"slot {slot} is already mapped")
        first = slot * self.blocks_per_slot
        self._mapped[slot] = True
        self._used[slot] = 0
        ids = list(range(first, first + self.blocks_per_slot))
        self._ids_of[slot] = ids
        self._free_in[slot] = ids.copy()
        self._into_bucket(slot, 0)
        self._num_free += self.blocks_per_slot
        self._num_mapped += 1

    def remove_slot(self, slot: int) -> None:
        """Slot `slot` is about to be unmapped; it must have no block in use."""
        self._check_slot(slot)
        if not self._mapped[slot]:
            raise ValueError(f"slot {slot} is not mapped")
        if self._used[slot]:
            raise ValueError(f"slot {slot} still has {self._used[slot]} blocks in use")
        self._out_of_bucket(slot, 0)
        self._mapped[slot] = False
        self._free_in[slot] = []
        self._ids_of[slot] = []
        self._num_free -= self.blocks_per_slot
        self._num_mapped -= 1

    # ---- blocks ----

    def alloc(self, n: int) -> list[int]:
        """Up to `n` free block ids (fewer if fewer are free), fullest slots first.

        The ids come slot by slot, ascending within each slot.
        """
        need = n if n < self._num_free else self._num_free
        if need <= 0:
            return []
        mask = self._bucket_mask
        used = mask.bit_length() - 1  # the fullest non-full slots, lowest first
        if need > self.blocks_per_slot - used:
            return self._alloc_slots(need)
        # All from one slot: the common case. This is `_take_from_lowest` and `_into_bucket`
        # written out: two method calls cost 10-15% of alloc(16) (bench_allocator).
        self._num_free -= need
        by_used = self._by_used
        bucket = by_used[used]
        slot = bucket[0]
        del bucket[0]
        if not bucket:
            mask ^= 1 << used
        free = self._free_in[slot]
        left = used + need
        self._used[slot] = left
        if left == self.blocks_per_slot:  # full now: in no bucket
            self._free_in[slot] = []
            self._bucket_mask = mask
            return free
        taken = free[:need]
        del free[:need]
        dest = by_used[left]
        if dest:
            insort(dest, slot)
        else:
            dest.append(slot)
            mask |= 1 << left
        self._bucket_mask = mask
        return taken

    def take(self, block_ids: list[int]) -> None:
        """Mark chosen free blocks as in use: for an engine that picks its own block ids (vLLM's
        block pool), instead of `alloc`'s page-aware order.

        Python work per slot touched; a run of blocks that lies side by side among its slot's free
        ids (what a free queue hands out) is checked and taken with one slice.

        Raises:
            ValueError: A block is out of range, on an unmapped slot, already in use, or given
                twice; nothing is taken then.
        """
        if not block_ids:
            return
        ids = sorted(block_ids)
        bps = self.blocks_per_slot
        for block in (ids[0], ids[-1]):
            if not 0 <= block < self.max_blocks:
                raise ValueError(f"block {block} is out of range (0..{self.max_blocks - 1})")
        # Check every run first, so that a refused batch takes nothing.
        runs: list[tuple[int, list[int], int]] = []  # (slot, its ids, where they start in its free ids)
        i = 0
        while i < len(ids):
            slot = ids[i] // bps
            j = bisect_left(ids, (slot + 1) * bps, i)
            run = ids[i:j]
            if not self._mapped[slot]:
                raise ValueError(f"block {run[0]} is not on a mapped slot")
            free_ids = self._free_in[slot]
            k = bisect_left(free_ids, run[0])
            if free_ids[k : k + len(run)] != run:
                # The common case (the run lies side by side among the slot's free ids, as the
                # blocks an engine's queue hands out do) is checked by that one comparison; this
                # is the general one, with the error.
                free = set(free_ids)
                for m, block in enumerate(run):
                    if m and block == run[m - 1]:
                        raise ValueError(f"block {block} is given twice")
                    if block not in free:
                        raise ValueError(f"block {block} is already in use")
                k = -1
            runs.append((slot, run, k))
            i = j
        for slot, run, k in runs:
            if k >= 0:
                del self._free_in[slot][k : k + len(run)]  # stays ascending
            else:
                taken = set(run)
                self._free_in[slot] = [b for b in self._free_in[slot] if b not in taken]  # stays ascending
            used = self._used[slot]
            self._used[slot] = used + len(run)
            self._out_of_bucket(slot, used)
            if used + len(run) < bps:  # a full slot is in no bucket
                self._into_bucket(slot, used + len(run))
        self._num_free -= len(ids)

    def _alloc_slots(self, need: int) -> list[int]:
        """`alloc` of `need` free blocks (no more than are free) over several slots."""
        bps = self.blocks_per_slot
        by_used, free_in, used_of = self._by_used, self._free_in, self._used
        self._num_free -= need
        out: list[int] = []
        while True:
            used = self._bucket_mask.bit_length() - 1  # the fullest non-full slots, lowest first
            bucket = by_used[used]
            per = bps - used  # free blocks on each of them
            if need < per:
                break
            # Every free block of the lowest `need // per` of them: they are full now.
            slots = bucket[: need // per]
            del bucket[: len(slots)]
            for slot in slots:
                out += free_in[slot]
                free_in[slot] = []
                used_of[slot] = bps
            need -= per * len(slots)
            if not bucket:
                self._bucket_mask ^= 1 << used
            if not need:
                return out
        out += self._take_from_lowest(used, need)  # the rest from one slot that stays partly free
        return out

    def _take_from_lowest(self, used: int, need: int) -> list[int]:
        """The lowest `need` free blocks of the lowest slot with `used` blocks in use.

        `need` is at most that slot's free blocks; the caller accounts for `_num_free`.
        """
        bucket = self._by_used[used]
        slot = bucket[0]
        del bucket[0]
        if not bucket:
            self._bucket_mask ^= 1 << used
        free = self._free_in[slot]
        left = used + need
        self._used[slot] = left
        if left == self.blocks_per_slot:  # full now: in no bucket
            self._free_in[slot] = []
            return free
        taken = free[:need]
        del free[:need]
        self._into_bucket(slot, left)
        return taken

    def _into_bucket(self, slot: int, used: int) -> None:
        """Put `slot`, now with `used` (< blocks_per_slot) blocks in use, into its bucket."""
        dest = self._by_used[used]
        if dest:
            insort(dest, slot)
        else:
            dest.append(slot)
            self._bucket_mask |= 1 << used

    def _out_of_bucket(self, slot: int, used: int) -> None:
        """Take `slot`, which had `used` blocks in use, out of its bucket (full slots are in none)."""
        if used < self.blocks_per_slot:
            bucket = self._by_used[used]
            del bucket[bisect_left(bucket, slot)]
            if not bucket:
                self._bucket_mask ^= 1 << used

    def free(self, block_ids: list[int]) -> list[int]:
        """Give blocks back; returns the slots that became empty, lowest first.

        Raises:
            ValueError: A block is out of range, on an unmapped slot, or not in use (or given twice);
                nothing is freed then.
        """
        if type(block_ids) is not list:  # a tuple, a numpy array...
            block_ids = list(block_ids)
        n = len(block_ids)
        if not n:
            return []
        first, last = block_ids[0], block_ids[-1]
        if last < first:  # perhaps a descending run (vLLM frees a request's blocks tail first)
            first, last = last, first
        bps = self.blocks_per_slot
        slot = first // bps
        base = slot * bps
        if first >= 0 and last < base + bps <= self.max_blocks:
            run = self._ids_of[slot][first - base : last - base + 1]  # empty if the slot is not mapped
            if run == block_ids or run[::-1] == block_ids:
                # The common case: consecutive ids on one mapped slot, ascending or descending. They
                # are in use iff no free id of the slot lies among them.
                free = self._free_in[slot]
                if free:
                    k = bisect_left(free, first)
                    if k < len(free) and free[k] <= last:
                        raise self._free_error(block_ids)
                    free[k:k] = run
                else:
                    self._free_in[slot] = run
                used = self._used[slot]
                left = used - n
                self._used[slot] = left
                # `_out_of_bucket` and `_into_bucket` written out, as in `alloc`: the hot path.
                by_used = self._by_used
                if used < bps:
                    bucket = by_used[used]
                    del bucket[bisect_left(bucket, slot)]
                    if not bucket:
                        self._bucket_mask ^= 1 << used
                dest = by_used[left]
                if dest:
                    insort(dest, slot)
                else:
                    dest.append(slot)
                    self._bucket_mask |= 1 << left
                self._num_free += n
                return [] if left else [slot]
        return self._free_slots(sorted(block_ids), block_ids)

    def _free_slots(self, ids: list[int], block_ids: list[int]) -> list[int]:
        """`free` in general: `ids` are `block_ids` sorted, on any number of slots.

        Slot by slot, each run of blocks is checked and given back; if a run is refused, the runs
        already given back are taken again (`_undo_free`) before raising.
        """
        n = len(ids)
        first, last = ids[0], ids[-1]
        if first < 0 or last >= self.max_blocks:
            raise self._free_error(block_ids)
        bps = self.blocks_per_slot
        mapped, free_in, ids_of, used_of = self._mapped, self._free_in, self._ids_of, self._used
        emptied = []
        i = 0
        while True:  # ids[i:j] are the blocks on `slot`
            slot = first // bps
            base = slot * bps
            if last < base + bps:
                j, top = n, last
            else:
                j = bisect_left(ids, base + bps, i)
                top = ids[j - 1]
            count = j - i
            if not mapped[slot]:
                break
            # A block on a mapped slot is in use iff it is not among the slot's free ids.
            free = free_in[slot]
            k = bisect_left(free, first)
            if count == 1:
                if k < len(free) and free[k] == first:
                    break
                free.insert(k, first)
            else:
                run = ids[i:j]
                consecutive = ids_of[slot][first - base : top - base + 1]
                if consecutive == run:
                    # No duplicate: in use iff no free id lies among them.
                    if k < len(free) and free[k] <= top:
                        break
                    if free:
                        free[k:k] = consecutive
                    else:
                        free_in[slot] = consecutive
                else:
                    unique = set(run)
                    if len(unique) != count or not unique.isdisjoint(free):
                        break
                    free += run
                    free.sort()
            used = used_of[slot]
            left = used - count
            used_of[slot] = left
            self._out_of_bucket(slot, used)
            self._into_bucket(slot, left)
            if not left:
                emptied.append(slot)
            if j == n:
                self._num_free += n
                return emptied
            i, first = j, ids[j]
        # The run on `slot` is refused: take back what was given back before it.
        self._num_free += i
        self._undo_free(ids[:i])
        raise self._free_error(block_ids)

    # ---- errors (off the hot path) ----

    def _was_in_use(self, block: int) -> bool:
        """From the slot state alone: on a mapped slot and not among its free ids."""
        if not 0 <= block < self.max_blocks:
            return False
        slot = block // self.blocks_per_slot
        return self._mapped[slot] and block not in self._free_in[slot]

    def _undo_free(self, ids: list[int]) -> None:
        """Take again sorted `ids`, just given back by a `free` that is being refused."""
        bps = self.blocks_per_slot
        i = 0
        while i < len(ids):
            slot = ids[i] // bps
            j = bisect_left(ids, slot * bps + bps, i)
            taken = set(ids[i:j])
            self._free_in[slot] = [b for b in self._free_in[slot] if b not in taken]
            used = self._used[slot]
            self._used[slot] = used + j - i
            self._out_of_bucket(slot, used)
            if used + j - i < bps:
                self._into_bucket(slot, used + j - i)
            i = j
        self._num_free -= len(ids)

    def _free_error(self, block_ids: list[int]) -> ValueError:
        """The error for the first bad block of a refused batch."""
        seen: set[int] = set()
        for block in block_ids:
            if not 0 <= block < self.max_blocks or not self._mapped[block // self.blocks_per_slot]:
                return ValueError(f"block {block} is not on a mapped slot")
            if block in seen or not self._was_in_use(block):
                return ValueError(f"block {block} is not in use (freed twice?)")
            seen.add(block)
        raise AssertionError(f"no bad block in {block_ids!r}")  # unreachable: the caller found one
