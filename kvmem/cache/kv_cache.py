"""An elastic KV cache: per-layer K and V tensors over one virtual reservation, backed page by page.

Design note
-----------
Layout. The reservation is cut into ``2 * num_layers`` equal *ranges*, one per layer's K and one
per layer's V, in the order K0, V0, K1, V1, ... Each range is one torch tensor shaped
``[max_blocks, block_size, num_kv_heads, head_dim]`` (layout "NHD"; "HND" swaps the two middle
axes), contiguous, so block ``b`` of a layer lives at ``b * block_bytes`` in that layer's range:
the strides paged-attention kernels expect. (kvcached's block-major layout, where one block of
every layer sits together, cost about 31% end-to-end throughput in its own benchmark.) Every number
of the layout comes from one `KVLayout` (`layout_descriptor`), which other processes read too.

Slots. Each range is cut into *slots* of `pages_per_slot` pages holding a whole number of blocks.
Growing by one slot maps `pages_per_slot` pages at the same slot of every range, so the same blocks
become usable in every layer's K and V at once (`kvmem.cache.slots`).

Allocation. `BlockAllocator` hands out blocks from the fullest mapped slots, so whole slots empty
out and can be given back. `alloc`, `free` and `take` are one call into it (C, with its own mutex:
`kvmem._block_allocator`) when mapped free blocks suffice: no syscall, no driver call, no lock
shared with another process, unless the cache must grow on the spot.

The parts, one job each:

- `kvmem.cache.slots`: map and unmap a slot's pages in every range (synchronizing before unmap).
- `kvmem.cache.growth`: watermarks, the daemon's target and reclaims, growth and shrink.
- `kvmem.cache.sleep`: sleep, offload and restore.
- `kvmem.cache.compaction`: moving live blocks so that slots empty.
- `kvmem.cache.state`: what they share, and the lock order.
- `kvmem.cache.tensors`: the torch views.

This class holds them together, runs the background thread (sleep requests, then shrink as asked,
then the watermarks) and gives engines their API. Running out is an outcome: `alloc` raises
`KVCacheFull` (and allocates nothing) when the limit or budget leaves no room; while asleep it
raises `KVCacheFull` with reason "asleep" and the tensors must not be touched.

Engines that choose their own blocks. An engine with a block pool of its own (vLLM's) decides
which block ids it uses; kvmem only backs them. It maps the slots it needs with `map_slots` and
marks its blocks with `take` instead of `alloc`; `free` is the same. `attach_engine` lends the
cache the engine's lock (held around every unmapping), an evictor (asked to drop blocks when the
daemon wants more slots back than are empty) and a callback told which slots went back. The
read-only view (`is_slot_mapped`, `num_mapped_slots`, `slot_usage`, `used_blocks`,
`sure_slots`, ...) is what such an engine may read of the cache's state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from kvmem.cache import tensors
from kvmem.cache.compaction import compact
from kvmem.cache.growth import Growth
from kvmem.cache.sleep import SleepCycle
from kvmem.cache.slots import SlotMap
from kvmem.cache.state import CacheState
from kvmem.common.layout import LAYOUTS, KVLayout
from kvmem.common.undo import Undo
from kvmem.page_source import Page, PageSource, Shortfall

logger = logging.getLogger(__name__)

ASLEEP = Shortfall("asleep", "the model is asleep: wait for kvctl wake")


class KVCacheFull(Exception):
    """`alloc(n)` cannot get `n` blocks: the model's limit or the budget leaves no room.

    Attributes:
        requested: Blocks asked for.
        available: Blocks that could be had now (free plus what growth found).
        shortfall: Why growth stopped.
        reason: ``shortfall.reason`` ("limit", "budget", "asleep", "disconnected", "capacity", ...).
    """

    def __init__(self, requested: int, available: int, shortfall: Shortfall):
        super().__init__(f"KV cache full: {requested} blocks requested, {available} available ({shortfall})")
        self.requested = requested
        self.available = available
        self.shortfall = shortfall
        self.reason = shortfall.reason


@dataclass(frozen=True)
class KVCacheStats:
    mapped_bytes: int
    used_blocks: int
    free_blocks: int
    max_blocks: int
    mapped_slots: int
    pages_held: int
    grows: int
    shrinks: int
    last_grow_s: float


class _Listener:
    """The cache's one `PageListener`: the daemon's requests, queued for the background thread."""

    def __init__(self, growth: Growth, sleep: SleepCycle):
        self._growth = growth
        self._sleep = sleep

    def reclaim(self, pages: int, reason: str) -> None:
        self._growth.reclaim(pages, reason)

    def target(self, target_pages: int) -> None:
        self._growth.set_target(target_pages)

    def sleep(self, offload: bool) -> None:
        self._sleep.queue("sleep", offload)

    def restore(self, pages: list[Page], offsets: list[int]) -> None:
        self._sleep.queue("restore", pages, offsets)

    def wake(self, restored: bool) -> None:
        self._sleep.queue("wake", restored)


class ElasticKVCache:
    """See the module docstring. Made by `Session.kv_cache`."""

    def __init__(
        self,
        source: PageSource,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: Any = "float16",
        max_tokens: int | None = None,
        layout: str = "NHD",
        low_watermark: int | None = None,
        high_watermark: int | None = None,
        grow_wait: float = 5.0,
        background: bool = True,
        sleep_hooks: Iterable[Callable[[bool], None]] = (),
        wake_hooks: Iterable[Callable[[bool], None]] = (),
    ):
        for name, value in (
            ("num_layers", num_layers),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: it must be a positive integer")
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        self.device = source.device
        self.dtype = tensors.resolve_dtype(dtype)
        self.layout = layout
        memory = self.device.memory_info().total if max_tokens is None else 0
        self._layout = KVLayout.for_tokens(
            num_layers,
            block_size,
            num_kv_heads,
            head_dim,
            str(self.dtype).removeprefix("torch."),
            layout,
            source.page_size,
            max_tokens,
            memory,
        )
        with Undo() as undo:
            slots = SlotMap(self.device, self._layout)
            undo.push(slots.close)
            self.reservation = slots.reservation
            # The reservation goes back if the views cannot be made.
            self.k, self.v = tensors.layer_tensors(self.device, self.reservation.address, self._layout, self.dtype)
        self._state = CacheState(source, slots)
        self._growth = Growth(self._state, low_watermark, high_watermark, grow_wait)
        self._sleep = SleepCycle(self._state, sleep_hooks, wake_hooks)
        self._closed = False
        source.listen(_Listener(self._growth, self._sleep))
        source.describe(self._layout.to_dict())
        if self._sleep.sleep_hooks:
            source.declare_drain_hook()
        # The hot path's calls, bound once (the allocator is the same object for the cache's life).
        allocator = self._state.allocator
        self._alloc_exact, self._free, self._try_take = allocator.alloc_exact, allocator.free, allocator.try_take
        # An alloc that leaves fewer free blocks than the low watermark wakes the background thread,
        # once until it has run (a notify costs more than an alloc); the thread re-arms it.
        allocator.set_low_watermark(self._growth.low_watermark, self._state.notify if background else None)
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="kvmem-cache-growth", daemon=True)
            self._thread.start()

    # ---- geometry (all from the layout descriptor) ----

    @property
    def layout_descriptor(self) -> KVLayout:
        """This cache's layout (geometry, strides, page and slot sizes, range offsets) as a `KVLayout`."""
        return self._layout

    @property
    def num_layers(self) -> int:
        return self._layout.num_layers

    @property
    def block_size(self) -> int:
        return self._layout.block_size

    @property
    def num_kv_heads(self) -> int:
        return self._layout.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self._layout.head_dim

    @property
    def block_bytes(self) -> int:
        return self._layout.block_bytes

    @property
    def page_size(self) -> int:
        return self._layout.page_size

    @property
    def pages_per_slot(self) -> int:
        return self._layout.pages_per_slot

    @property
    def slot_bytes(self) -> int:
        return self._layout.slot_bytes

    @property
    def blocks_per_slot(self) -> int:
        return self._layout.blocks_per_slot

    @property
    def num_ranges(self) -> int:
        return self._layout.num_ranges

    @property
    def max_slots(self) -> int:
        return self._layout.max_slots

    @property
    def max_blocks(self) -> int:
        return self._layout.max_blocks

    @property
    def range_bytes(self) -> int:
        return self._layout.range_bytes

    @property
    def pages_per_growth(self) -> int:
        """Pages one slot takes over every range (what one growth unit asks the source for)."""
        return self._state.slots.pages_per_growth

    @property
    def low_watermark(self) -> int:
        return self._growth.low_watermark

    @property
    def high_watermark(self) -> int:
        return self._growth.high_watermark

    # ---- tensors ----

    def range_address(self, layer: int, kind: str) -> int:
        """Device address of layer `layer`'s K (``"k"``) or V (``"v"``) range."""
        return self.block_address(layer, kind, 0)

    def block_address(self, layer: int, kind: str, block: int) -> int:
        """Device address of block `block` of layer `layer`'s K or V."""
        return self.reservation.address + self._layout.block_offset(2 * layer + (0 if kind == "k" else 1), block)

    def reservation_tensor(self):
        """The whole reservation as one flat uint8 tensor (all ranges, K0, V0, K1, ... in order).

        For engines that lay their own views over the bytes (the vLLM integration). Only mapped
        slots may be touched; like `k` and `v`, it must not be used after `close()`. None on a
        CUDA device without CUDA torch.
        """
        return tensors.bytes_tensor(self.device, self.reservation.address, self._layout.reservation_bytes)

    # ---- the read-only view (what an engine may read of the cache's state) ----

    def get_num_free_blocks(self) -> int:
        """Free blocks on mapped slots."""
        return self._state.allocator.get_num_free_blocks()

    def get_num_used_blocks(self) -> int:
        return self._state.allocator.get_num_used_blocks()

    def num_mapped_slots(self) -> int:
        return self._state.allocator.get_num_mapped_slots()

    def is_slot_mapped(self, slot: int) -> bool:
        """Whether slot `slot` (``block // blocks_per_slot``) is mapped, its blocks usable."""
        return self._state.allocator.is_mapped(slot)

    def slot_usage(self) -> list[tuple[int, int]]:
        """``(slot, blocks in use)`` of every mapped slot, the fullest first (`BlockAllocator.get_slot_usage`)."""
        return self._state.allocator.get_slot_usage()

    def used_blocks(self, slot: int) -> list[int]:
        """The blocks in use on mapped slot `slot`, ascending."""
        return self._state.allocator.get_used_blocks(slot)

    def sure_pages(self) -> int:
        """Pages the page source is sure to grant now (a local budget's room; 0 from a daemon)."""
        return self._state.source.sure_pages()

    def sure_slots(self) -> int:
        """Unmapped slots that growth is sure to map now (`sure_pages` in whole slots)."""
        return self.sure_pages() // self.pages_per_growth

    @property
    def target_pages(self) -> int:
        """Pages the daemon wants this cache to hold at most now: -1 for no target, 0 while asleep."""
        return self._growth.effective_target()

    @property
    def reclaim_pages(self) -> int:
        """Pages the daemon asked back (RECLAIM) that no slot given back has answered yet."""
        return self._growth.reclaim_pages

    @property
    def asleep(self) -> bool:
        """Whether the model sleeps (from the sleep request until its wake is complete)."""
        return self._state.asleep

    # ---- blocks ----

    def alloc(self, n: int) -> list[int]:
        """`n` block ids, growing on demand if the mapped free blocks do not suffice.

        Raises:
            KVCacheFull: Not `n` blocks to be had (limit, budget, capacity); nothing is allocated.
        """
        # The hot path (bench_allocator's engine paths): one call, which hands out `n` ids when
        # mapped free blocks suffice and the cache is open and awake (the allocator's gate), and
        # wakes growth below the low watermark. None: the slow path says why, or grows.
        ids = self._alloc_exact(n)
        if ids is not None:
            return ids
        return self._alloc_slow(n)

    def _alloc_slow(self, n: int) -> list[int]:
        """`alloc` when the free blocks do not suffice or the gate is shut: grow, or raise why not."""
        if n < 0:
            raise ValueError(f"alloc({n}): n must be >= 0")
        self._check_open()
        if self._state.asleep:
            raise KVCacheFull(n, 0, ASLEEP)
        shortfall = self._growth.grow_for(n)
        ids = self._alloc_exact(n)
        if ids is not None:
            return ids
        self._check_open()
        if self._state.asleep:  # it fell asleep meanwhile
            raise KVCacheFull(n, 0, ASLEEP)
        raise KVCacheFull(n, self._state.allocator.get_num_free_blocks(), shortfall or Shortfall("capacity"))

    def free(self, block_ids: list[int]) -> None:
        """Give blocks back (any iterable of ints). Emptied slots are returned in the background when
        above target.

        Raises:
            ValueError: A block is not in use on a mapped slot (`BlockAllocator.free`); nothing is freed.
        """
        if self._free(block_ids):  # slots emptied: the background thread gives them back if asked to
            growth = self._growth
            # Cheap first (a batch of a slot or more empties slots on every free): no reclaim, no target
            # (-1) and awake mean no shrink is wanted; else ask the policy.
            if (growth.reclaim_pages > 0 or growth.target_pages >= 0 or self._state.asleep) and growth.wants_shrink():
                self._state.notify()

    def map_slots(self, slots: Iterable[int], wait: float | None = None, ahead: Iterable[int] = ()) -> Shortfall | None:
        """Map these page slots (those not mapped yet), for an engine that chooses its own blocks.

        Args:
            slots: Slot numbers (``block // blocks_per_slot``).
            wait: Seconds to wait for the daemon's pages (default: `grow_wait`).
            ahead: Slots the engine will use next, in that order: mapped in the same growth if
                their pages are ready (the daemon's free pages), never waited for. How many to
                name is the engine's call (`demand_blocks` says what its demand uses).

        Returns:
            None when every slot asked for is mapped afterwards (`ahead` aside); else why growth
            stopped. A short answer maps the lowest of the slots asked for, as many as the pages
            granted cover.

        Raises:
            ValueError: A slot is out of range.
        """
        self._check_open()
        wanted = sorted(set(slots))
        extra = list(ahead)
        for slot in (*wanted, *extra):
            if not 0 <= slot < self.max_slots:
                raise ValueError(f"slot {slot} is out of range (0..{self.max_slots - 1})")
        if self._state.asleep:
            return ASLEEP
        return self._growth.map_slots(wanted, self._growth.grow_wait if wait is None else wait, extra)

    def demand_blocks(self, pending: int = 0) -> int:
        """The blocks the measured demand (`pending` blocks about to be taken counted) uses in the
        next second (kvmem/cache/growth.py, `DemandMeter`): for an engine that maps its own slots,
        how far ahead a growth should map."""
        return self._growth.demand.blocks(pending)

    def take(self, block_ids: list[int]) -> None:
        """Mark chosen free blocks on mapped slots as in use (the `alloc` of an engine that picks its
        own block ids; see `map_slots`). Nothing is mapped here.

        Raises:
            KVCacheFull: The model is asleep (reason "asleep"); nothing is taken.
            ValueError: A block is not free on a mapped slot (`BlockAllocator.take`); nothing is taken.
        """
        if not self._try_take(block_ids):  # the gate is shut: closed or asleep
            self._check_open()
            raise KVCacheFull(len(block_ids), 0, ASLEEP)

    def report_engine_usage(self, used_slots: int) -> None:
        """Report which part of the cache holds live blocks, as the engine counts it: `used_slots`
        slots (at most the mapped ones). For an engine whose blocks the cache cannot tell apart:
        vLLM's ranks mark every block of their mapped slots in use, and only the scheduler, in
        another process, knows which are free. From the first call the page source (the daemon's
        USED figure, and its choice of whom to ask for idle pages) hears this count, not the
        allocator's.
        """
        state = self._state
        state.engine_used_slots = max(0, min(used_slots, self.num_mapped_slots()))
        state.report_usage()

    def attach_engine(
        self,
        lock: AbstractContextManager,
        evictor: Callable[[int], None] | None = None,
        on_unmapped: Callable[[list[int]], None] | None = None,
    ) -> None:
        """Lend the cache an engine's lock and hooks (an engine with a block pool of its own).

        Args:
            lock: Held around every unmapping, taken before the cache's own locks (never after
                them): an engine that counts its free blocks and allocates under it never sees
                them vanish in between.
            evictor: ``f(slots)``: the daemon wants `slots` more slots back than are empty; free
                blocks the engine can drop (cached, unreferenced ones) so that slots empty. Called
                on the background thread with `lock` held.
            on_unmapped: ``f(slots)``: these slots went back (after the unmapping).
        """
        engine = self._state.engine
        engine.lock, engine.evictor, engine.on_unmapped = lock, evictor, on_unmapped

    def add_sleep_hook(self, hook: Callable[[bool], None]) -> None:
        """Run ``hook(offload)`` when the operator puts the model to sleep (see `Session.on_sleep`), and
        tell the daemon the engine can drain: a model whose engine registered none is never put to sleep
        while it holds pages (its engine could still be using them)."""
        self._sleep.sleep_hooks.append(hook)
        self._state.source.declare_drain_hook()

    @property
    def sleep_hooks(self) -> tuple[Callable[[bool], None], ...]:
        """The sleep hooks (`add_sleep_hook` adds one)."""
        return tuple(self._sleep.sleep_hooks)

    @property
    def wake_hooks(self) -> list[Callable[[bool], None]]:
        """``f(restored)``, run when the model is awake again (see `Session.on_wake`)."""
        return self._sleep.wake_hooks

    # ---- shrink and compaction ----

    def shrink(self, max_slots: int | None = None) -> int:
        """Unmap and return up to `max_slots` empty slots (all empty ones by default); how many.
        The pages returned count against a pending reclaim (`reclaim_pages`)."""
        growth = self._growth
        done = growth.shrink(max_slots)
        growth.reclaim_pages = max(0, growth.reclaim_pages - done * growth.per_growth)
        return done

    def compact(self) -> dict[int, int]:
        """Move live blocks so that the fewest slots hold them and give the emptied slots back; see
        `kvmem.cache.compaction.compact` for the contract. Returns ``{old block id: new block id}``."""
        return compact(self._state, self._growth, self.k, self.v)

    # ---- background thread ----

    def _run(self) -> None:
        state = self._state
        while not self._closed:
            state.wait(0.05)
            state.allocator.wake_pending = False  # from here an alloc below the low watermark wakes it again
            if self._closed:
                return
            try:
                self._sleep.handle_events()
                state.report_usage()
                self._growth.shrink_as_asked()
                self._sleep.finish_discard()
                if not state.asleep:
                    self._growth.keep_watermarks()
            except Exception:
                logger.exception("kvmem cache: background growth failed")
                time.sleep(0.5)

    # ---- lifecycle ----

    def stats(self) -> KVCacheStats:
        state = self._state
        free, used, _, _ = state.allocator.counts()  # read at one instant
        slots = len(state.slots.mapped)
        pages = slots * state.slots.pages_per_growth
        return KVCacheStats(
            mapped_bytes=pages * self.page_size,
            used_blocks=used,
            free_blocks=free,
            max_blocks=self.max_blocks,
            mapped_slots=slots,
            pages_held=pages,
            grows=state.counters.grows,
            shrinks=state.counters.shrinks,
            last_grow_s=state.counters.last_grow_s,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the KV cache is closed")

    def close(self) -> None:
        """Stop growing, unmap everything (after synchronizing) and return every page. Idempotent.

        The tensors `k` and `v` must not be used afterwards: their memory is unmapped.
        """
        if self._closed:
            return
        self._closed = True
        state = self._state
        state.allocator.closed = True  # the gate: no alloc or take hands out a block from here
        state.notify()
        if self._thread is not None:
            self._thread.join()
        with state.grow_lock:
            self.k = self.v = None  # the tensors must not outlive the mappings
            unmapped = state.slots.unmap(sorted(state.slots.mapped))
            returned = [page for entry in unmapped for page in entry.pages] + self._sleep.drop_restoring()
            returned += state.spare
            state.spare = []
            if returned:
                state.source.release(returned)
            state.slots.close()

    def __enter__(self) -> ElasticKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
