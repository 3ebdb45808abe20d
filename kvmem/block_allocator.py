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
- slot `s` is in ``by_used[used[s]]`` iff it is mapped.

This class does no locking and no I/O: `ElasticKVCache` holds the lock around it.
"""

from __future__ import annotations


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
        # Free block ids of each mapped slot, highest first, so pop() yields the lowest.
        self._free_in: list[list[int]] = [[] for _ in range(max_slots)]
        # Mapped slots by how many blocks they have in use (0 .. blocks_per_slot).
        self._by_used: list[set[int]] = [set() for _ in range(blocks_per_slot + 1)]
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
        return sorted(self._by_used[0], reverse=True)

    def get_unmapped_slots(self, n: int) -> list[int]:
        """The `n` lowest slots not mapped (where growth should map next), or fewer."""
        out = []
        for slot in range(self.max_slots):
            if not self._mapped[slot]:
                out.append(slot)
                if len(out) == n:
                    break
        return out

    # ---- slots ----

    def add_slot(self, slot: int) -> None:
        """Slot `slot` has just been mapped: its blocks become free."""
        if self._mapped[slot]:
            raise ValueError(f"slot {slot} is already mapped")
        first = slot * self.blocks_per_slot
        self._mapped[slot] = True
        self._used[slot] = 0
        self._free_in[slot] = list(range(first + self.blocks_per_slot - 1, first - 1, -1))
        self._by_used[0].add(slot)
        self._num_free += self.blocks_per_slot
        self._num_mapped += 1

    def remove_slot(self, slot: int) -> None:
        """Slot `slot` is about to be unmapped; it must have no block in use."""
        if not self._mapped[slot]:
            raise ValueError(f"slot {slot} is not mapped")
        if self._used[slot]:
            raise ValueError(f"slot {slot} still has {self._used[slot]} blocks in use")
        self._by_used[0].discard(slot)
        self._mapped[slot] = False
        self._free_in[slot] = []
        self._num_free -= self.blocks_per_slot
        self._num_mapped -= 1

    # ---- blocks ----

    def alloc(self, n: int) -> list[int]:
        """Up to `n` free block ids (fewer if fewer are free), fullest slots first."""
        if n <= 0:
            return []
        out: list[int] = []
        need = min(n, self._num_free)
        bps = self.blocks_per_slot
        # Fullest non-full slots first: used = bps-1 down to 0.
        for used in range(bps - 1, -1, -1):
            bucket = self._by_used[used]
            while bucket and len(out) < need:
                slot = min(bucket)
                free = self._free_in[slot]
                take = min(need - len(out), len(free))
                out.extend(free[-1 : -take - 1 : -1])  # the lowest `take` ids, ascending
                del free[-take:]
                bucket.discard(slot)
                self._used[slot] = used + take
                self._by_used[used + take].add(slot)
            if len(out) == need:
                break
        self._num_free -= len(out)
        return out

    def free(self, block_ids: list[int]) -> list[int]:
        """Give blocks back; returns the slots that became empty.

        Raises:
            ValueError: A block is out of range, on an unmapped slot, or not in use; nothing
                is freed then.
        """
        bps = self.blocks_per_slot
        seen: set[int] = set()
        for block in block_ids:
            if not 0 <= block < self.max_blocks or not self._mapped[block // bps]:
                raise ValueError(f"block {block} is not on a mapped slot")
            if block in seen or block in self._free_in[block // bps]:
                raise ValueError(f"block {block} is not in use (freed twice?)")
            seen.add(block)
        emptied = []
        for block in block_ids:
            slot = block // bps
            used = self._used[slot]
            self._by_used[used].discard(slot)
            self._used[slot] = used - 1
            self._by_used[used - 1].add(slot)
            free = self._free_in[slot]
            # Keep the stack ordered (highest first) so the next alloc yields the lowest id.
            if not free or block < free[-1]:
                free.append(block)
            else:
                lo, hi = 0, len(free)
                while lo < hi:
                    mid = (lo + hi) // 2
                    if free[mid] > block:
                        lo = mid + 1
                    else:
                        hi = mid
                free.insert(lo, block)
            if used == 1:
                emptied.append(slot)
        self._num_free += len(block_ids)
        return emptied
