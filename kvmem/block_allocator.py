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
- blocks in use plus free blocks make `blocks_per_slot` on every mapped slot; an unmapped slot has
  neither;
- a refused call (a bad id, a slot out of range) changes nothing.

`BlockAllocator` is written in C (``kvmem/_block_allocator.c``: its design note gives the data
structures, the invariants it keeps for speed and what `_check()` verifies), built by every install
of kvmem. It holds a mutex of its own around every call, so each call is atomic whatever threads
call it (free-threaded builds included); `ElasticKVCache`'s hot path is one call into it:
`alloc_exact` (the ids, or None so that the cache takes its slow path), `free`, `try_take`. The
gate (`paused`, `closed`) stops `alloc_exact` and `try_take` handing out blocks while a cache sleeps
or after it closed.
"""

from __future__ import annotations

from kvmem._block_allocator import BlockAllocator

__all__ = ["BlockAllocator"]
