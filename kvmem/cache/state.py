"""What the parts of an elastic KV cache share: the page source, the slots, the block allocator,
the locks that guard them, and the hooks of an engine that chooses its own blocks.

Lock order (a lock is only ever taken while holding those before it, never after):

1. `EngineHooks.lock`: the engine's own lock (vLLM's pool lends it). Every unmapping (shrink,
   sleep) holds it, so an engine that counts its free blocks and then allocates under it never
   sees them vanish in between.
2. `CacheState.grow_lock`: one mapper or unmapper at a time; guards `CacheState.slots`.
3. The block allocator's own mutex (`kvmem._block_allocator`): held inside each of its calls only,
   never across a device call or a request to the page source, and no Python code runs under it, so
   `alloc`/`free` never wait on the driver. Each allocator call is atomic; a sequence of calls that
   must not interleave with mapping or unmapping holds `grow_lock` (only its holders add or remove
   slots), and one that must not interleave with allocs is a single call (`remove_empty_slots`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from kvmem.block_allocator import BlockAllocator
from kvmem.cache.slots import SlotMap
from kvmem.page_source import Page, PageSource


@dataclass
class EngineHooks:
    """Hooks of an engine with a block pool of its own (see `ElasticKVCache.attach_engine`).

    Attributes:
        lock: Held around every unmapping (lock order: first).
        evictor: ``f(slots)``: free blocks the engine can drop, so that that many more slots empty.
        on_unmapped: ``f(slots)``: these slots went back (called after the unmapping, no lock held).
    """

    lock: AbstractContextManager = field(default_factory=contextlib.nullcontext)
    evictor: Callable[[int], None] | None = None
    on_unmapped: Callable[[list[int]], None] | None = None


@dataclass
class CacheCounters:
    """Growths and shrinks so far, and how long the last growth took (for `ElasticKVCache.stats`)."""

    grows: int = 0
    shrinks: int = 0
    last_grow_s: float = 0.0


class CacheState:
    """The state the cache's parts share (see the module docstring for the lock order).

    Attributes:
        source: Where pages come from and go back to.
        slots: The reservation and its mapped slots (guarded by `grow_lock`).
        allocator: Block bookkeeping (its own mutex guards it); the same object for the cache's life
            (a wake that lost the cache resets it), so the cache may keep its bound methods.
        engine: The engine's hooks.
        asleep: From the sleep request until the wake is complete: the allocator's gate
            (`BlockAllocator.paused`), so no alloc or take hands out a block once it is set.
        counters: Grows and shrinks, for `stats`.
    """

    def __init__(self, source: PageSource, slots: SlotMap):
        self.source = source
        self.slots = slots
        layout = slots.layout
        self.allocator = BlockAllocator(layout.blocks_per_slot, layout.max_slots)
        self.grow_lock = threading.Lock()
        self.engine = EngineHooks()
        self.counters = CacheCounters()
        # Pages granted that do not make a whole growth unit yet (a short grant): kept, unmapped, and
        # topped up by the next growth rather than returned and asked for again. Guarded by grow_lock.
        self.spare: list[Page] = []
        self._reported_used_slots = 0
        # Slots holding live blocks as the engine counts them (`ElasticKVCache.report_engine_usage`);
        # None: the cache counts them itself, from its allocator.
        self.engine_used_slots: int | None = None
        self._wake = threading.Condition()

    @property
    def asleep(self) -> bool:
        return self.allocator.paused

    @asleep.setter
    def asleep(self, value: bool) -> None:
        self.allocator.paused = value

    def release_spare(self) -> None:
        """Give back the spare pages (grow lock held): the cache shrinks, sleeps or closes."""
        if self.spare:
            spare, self.spare = self.spare, []
            self.source.release(spare)

    def notify(self) -> None:
        """Wake the background thread."""
        with self._wake:
            self._wake.notify()

    def wait(self, timeout: float) -> None:
        """Sleep on the background thread until `notify` or `timeout` seconds."""
        with self._wake:
            self._wake.wait(timeout=timeout)

    def report_usage(self) -> None:
        """Tell the source how many pages hold live blocks, if that changed (not on the hot path)."""
        engine_count = self.engine_used_slots
        used_slots = self.allocator.counts()[3] if engine_count is None else engine_count
        if used_slots != self._reported_used_slots:
            self._reported_used_slots = used_slots
            self.source.report_usage(used_slots * self.slots.pages_per_growth)

    def forget_usage(self) -> None:
        """The source counts no page in use any more (they all left with an offloading sleep)."""
        self._reported_used_slots = 0
