"""An elastic KV cache: per-layer K and V tensors over one virtual reservation, backed page by page.

Design note
-----------
Layout. The reservation is cut into ``2 * num_layers`` equal *ranges*, one per layer's K and one
per layer's V, in the order K0, V0, K1, V1, ... Each range is one torch tensor shaped
``[max_blocks, block_size, num_kv_heads, head_dim]`` (layout "NHD"; "HND" swaps the two middle
axes), contiguous, so block ``b`` of a layer lives at ``b * block_bytes`` in that layer's range:
the strides paged-attention kernels expect. (kvcached's block-major layout, where one block of
every layer sits together, cost about 31% end-to-end throughput in its own benchmark.)
`layout_descriptor` writes this layout down for other processes and tools (`kvmem.common.layout`).

Slots. Each range is cut into *slots* of `pages_per_slot` pages holding a whole number of blocks
(one page when the page size is a multiple of the block size, else the least common multiple of
the two). Growing by one slot maps `pages_per_slot` pages at the same slot of every range, so the
same blocks become usable in every layer's K and V at once; access is then set with one call per
contiguous run of new slots in each range, never per page.

Allocation. `BlockAllocator` hands out blocks from the fullest mapped slots, so whole slots empty
out and can be given back. `alloc` and `free` only take an in-process lock: no syscall, no driver
call, no lock shared with another process, unless the cache must grow on the spot.

Growth and shrink. A background thread keeps the mapped free blocks between the low and high
watermarks by asking the page source ahead of demand (`alloc` grows on demand only when the free
blocks run out), and gives whole empty slots back once the free blocks exceed the high watermark
by a slot or more. When the daemon asks pages back (reclaim, a lowered limit, sleep), or holds the
cache to a target, the thread unmaps empty slots and returns their pages; a slot with a live
block is never unmapped. Before unmapping, it synchronizes the device: work issued on the cache's
tensors may still be reading the slot (cuMemUnmap does not wait).

Sleep. When the operator puts the model to sleep (`kvctl sleep`), the background thread first
runs the engine's sleep hooks (`on_sleep`: stop admitting work, finish or preempt what runs). Then
- discard: empty slots go back as the engine frees its blocks; once none is left, the cache says
  slept. The engine is expected to free every block in its hook (the contents are discarded).
- offload: after synchronizing, every mapped slot is unmapped; slots with live blocks go to the
  daemon's host tier with the offset of each page, empty ones go back. The block allocator keeps
  its state, so the engine's block ids (and its prefix cache) stay valid. On wake the daemon hands
  pages back with those offsets; each is mapped where it was, and the cache reads bit-identical.
While asleep, `alloc` raises `KVCacheFull` (reason "asleep") and the tensors must not be touched:
their memory is unmapped. After wake the hooks `on_wake(restored)` run; `restored` is False when
an offloaded cache was lost (then every block is freed and the engine must drop its block ids).

Running out is an outcome: `alloc` raises `KVCacheFull` (and allocates nothing) when the limit or
budget leaves no room.

Engines that choose their own blocks. An engine with a block pool of its own (vLLM's) decides
which block ids it uses; kvmem only backs them. It maps the slots it needs with `map_slots`
(growth of exactly those slots; the answer says why when the daemon gave less) and marks its
blocks with `take` instead of `alloc`; `free` is the same. Three hooks let the background thread
give memory back without pulling it from under such an engine: every unmapping (shrink, sleep)
holds `engine_lock`, so an engine that counts its free blocks and then allocates under that lock
never sees them vanish in between; when the daemon wants more slots back than are empty,
`evictor(slots)` asks the engine to free blocks it can drop (cached, unreferenced ones) so that
slots empty; and `on_unmapped(slots)` tells it which slots went back.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from kvmem.block_allocator import BlockAllocator
from kvmem.common.layout import DTYPES, LAYOUTS, KVLayout
from kvmem.device import Access, Mapping
from kvmem.page_source import PageSource

logger = logging.getLogger(__name__)


class KVCacheFull(Exception):
    """`alloc(n)` cannot get `n` blocks: the model's limit or the budget leaves no room.

    Attributes:
        requested: Blocks asked for.
        available: Blocks that could be had now (free plus what growth found).
        reason: Why growth stopped ("limit", "budget", "asleep", "disconnected", "capacity").
    """

    def __init__(self, requested: int, available: int, reason: str, detail: str = ""):
        super().__init__(
            f"KV cache full: {requested} blocks requested, {available} available ({reason}{': ' if detail else ''}"
            f"{detail})"
        )
        self.requested = requested
        self.available = available
        self.reason = reason


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


def _torch():
    import torch

    return torch


def _resolve_dtype(dtype: Any):
    torch = _torch()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = getattr(torch, dtype)
    if str(dtype).removeprefix("torch.") not in DTYPES:
        raise ValueError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
    return dtype


class _CudaMemory:
    """A raw device range exposed through __cuda_array_interface__ (bytes, read/write)."""

    def __init__(self, address: int, size: int):
        self.__cuda_array_interface__ = {
            "shape": (size,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
        }


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
        torch = _torch()
        self.source = source
        self.device = source.device
        self.dtype = _resolve_dtype(dtype)
        self.num_layers = num_layers
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layout = layout
        self.grow_wait = grow_wait
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.block_bytes = block_size * num_kv_heads * head_dim * itemsize
        page = source.page_size
        self.page_size = page
        self.pages_per_slot = math.lcm(page, self.block_bytes) // page
        self.slot_bytes = self.pages_per_slot * page
        self.blocks_per_slot = self.slot_bytes // self.block_bytes
        self.num_ranges = 2 * num_layers
        if max_tokens is None:  # default: as many tokens as the device's memory could hold
            max_tokens = self.device.memory_info().total // (self.num_ranges * self.block_bytes) * block_size
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens}: the cache must hold at least one token")
        max_blocks = -(-max_tokens // block_size)
        self.max_slots = -(-max_blocks // self.blocks_per_slot)
        self.range_bytes = self.max_slots * self.slot_bytes
        self.allocator = BlockAllocator(self.blocks_per_slot, self.max_slots)
        self.max_blocks = self.allocator.max_blocks
        self.pages_per_growth = self.num_ranges * self.pages_per_slot
        self._layout_descriptor = KVLayout.derive(
            num_layers,
            block_size,
            num_kv_heads,
            head_dim,
            str(self.dtype).removeprefix("torch."),
            layout,
            page,
            self.max_blocks,
        )
        default_low = self.blocks_per_slot // 2
        self.low_watermark = default_low if low_watermark is None else low_watermark
        self.high_watermark = max(
            self.low_watermark, self.blocks_per_slot if high_watermark is None else high_watermark
        )

        self.reservation = self.device.reserve(self.num_ranges * self.range_bytes)
        self._lock = threading.Lock()  # allocator state
        self._grow_lock = threading.Lock()  # one grower or shrinker at a time
        self._slots: dict[int, tuple[list, list[Mapping]]] = {}  # slot -> (pages, mappings)
        self._target_pages = -1
        self._reclaim_pages = 0
        self._reported_used_slots = 0
        self._closed = False
        self._stats = {"grows": 0, "shrinks": 0, "last_grow_s": 0.0}
        self._wake = threading.Condition()
        # Sleep: requests from the client's reader thread, handled in order by the background thread.
        self._sleep_events: deque[tuple] = deque()
        self.sleep_hooks: list[Callable[[bool], None]] = list(sleep_hooks)
        self.wake_hooks: list[Callable[[bool], None]] = list(wake_hooks)
        self._asleep = False
        self._discard_pending = False  # a discarding sleep waits for the slots to empty
        self._offloaded_slots: set[int] = set()  # slots whose pages are in the host tier
        self._restoring: dict[int, list] = {}  # slot -> [(page, mapping) or None] per page, during a wake
        # Hooks of an engine that chooses its own blocks (see the module docstring). The lock is
        # taken before the grow lock, never after it.
        self.engine_lock: AbstractContextManager = contextlib.nullcontext()
        self.evictor: Callable[[int], None] | None = None
        self.on_unmapped: Callable[[list[int]], None] | None = None
        source.on_reclaim = self._on_reclaim
        source.on_target = self._on_target
        source.on_sleep = lambda offload: self._queue_sleep_event("sleep", offload)
        source.on_restore = lambda pages, offsets: self._queue_sleep_event("restore", pages, offsets)
        source.on_wake = lambda restored: self._queue_sleep_event("wake", restored)
        self.k, self.v = self._make_tensors()
        source.describe(self._layout_descriptor.to_dict())
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="kvmem-cache-growth", daemon=True)
            self._thread.start()

    # ---- tensors ----

    @property
    def layout_descriptor(self) -> KVLayout:
        """This cache's layout (geometry, strides, page and slot sizes, range offsets) as a `KVLayout`."""
        return self._layout_descriptor

    def _shape(self) -> tuple[int, ...]:
        if self.layout == "NHD":
            return (self.max_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        return (self.max_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    def range_address(self, layer: int, kind: str) -> int:
        """Device address of layer `layer`'s K (``"k"``) or V (``"v"``) range."""
        index = 2 * layer + (0 if kind == "k" else 1)
        return self.reservation.address + index * self.range_bytes

    def block_address(self, layer: int, kind: str, block: int) -> int:
        """Device address of block `block` of layer `layer`'s K or V."""
        return self.range_address(layer, kind) + block * self.block_bytes

    def _bytes_tensor(self, address: int, size: int):
        """A flat uint8 tensor over `size` bytes of the reservation at `address`; None without CUDA torch."""
        torch = _torch()
        if self.device.kind == "host":
            return torch.frombuffer((ctypes.c_ubyte * size).from_address(address), dtype=torch.uint8)
        if torch.cuda.is_available():
            return torch.as_tensor(_CudaMemory(address, size), device=f"cuda:{self.device.ordinal}")
        return None  # a CUDA device without CUDA torch (e.g. the fake driver): no tensors

    def reservation_tensor(self):
        """The whole reservation as one flat uint8 tensor (all ranges, K0, V0, K1, ... in order).

        For engines that lay their own views over the bytes (the vLLM integration). Only mapped
        slots may be touched; like `k` and `v`, it must not be used after `close()`.
        """
        return self._bytes_tensor(self.reservation.address, self.num_ranges * self.range_bytes)

    def _make_tensors(self) -> tuple[list, list]:
        def view(address: int):
            raw = self._bytes_tensor(address, self.range_bytes)
            return None if raw is None else raw.view(self.dtype).view(self._shape())

        keys = [view(self.range_address(layer, "k")) for layer in range(self.num_layers)]
        values = [view(self.range_address(layer, "v")) for layer in range(self.num_layers)]
        return keys, values

    # ---- blocks ----

    def get_num_free_blocks(self) -> int:
        return self.allocator.get_num_free_blocks()

    def get_num_used_blocks(self) -> int:
        return self.allocator.get_num_used_blocks()

    def alloc(self, n: int) -> list[int]:
        """`n` block ids, growing on demand if the mapped free blocks do not suffice.

        Raises:
            KVCacheFull: Not `n` blocks to be had (limit, budget, capacity); nothing is allocated.
        """
        if n < 0:
            raise ValueError(f"alloc({n}): n must be >= 0")
        if self._closed:
            raise RuntimeError("the KV cache is closed")
        if self._asleep:
            raise KVCacheFull(n, 0, "asleep", "the model is asleep: wait for kvctl wake")
        with self._lock:
            if self.allocator.get_num_free_blocks() >= n:
                ids = self.allocator.alloc(n)
                self._maybe_wake_locked()
                return ids
        reason, detail = self._grow_for(n)
        with self._lock:
            free = self.allocator.get_num_free_blocks()
            if free < n:
                raise KVCacheFull(n, free, reason or "capacity", detail)
            ids = self.allocator.alloc(n)
            self._maybe_wake_locked()
            return ids

    def free(self, block_ids: list[int]) -> None:
        """Give blocks back. Emptied slots are returned in the background when above target."""
        with self._lock:
            emptied = self.allocator.free(block_ids)
        if emptied and (self._reclaim_pages > 0 or self._over_target()):
            self._notify()

    def map_slots(self, slots: Iterable[int], wait: float | None = None) -> tuple[str | None, str]:
        """Map these page slots (those not mapped yet), for an engine that chooses its own blocks.

        Args:
            slots: Slot numbers (``block // blocks_per_slot``).
            wait: Seconds to wait for the daemon's pages (default: `grow_wait`).

        Returns:
            ``(None, "")`` when every slot asked for is mapped afterwards; else why growth stopped
            ("limit", "budget", "asleep", ...) and a detail. A short answer maps the lowest of the
            slots asked for, as many as the pages granted cover.

        Raises:
            ValueError: A slot is out of range.
        """
        if self._closed:
            raise RuntimeError("the KV cache is closed")
        wanted = sorted(set(slots))
        for slot in wanted:
            if not 0 <= slot < self.max_slots:
                raise ValueError(f"slot {slot} is out of range (0..{self.max_slots - 1})")
        if self._asleep:
            return "asleep", "the model is asleep: wait for kvctl wake"
        with self._grow_lock:
            with self._lock:
                todo = [slot for slot in wanted if not self.allocator.is_mapped(slot)]
            if not todo:
                return None, ""
            return self._grow_slots(len(todo), self.grow_wait if wait is None else wait, targets=todo)

    def take(self, block_ids: list[int]) -> None:
        """Mark chosen free blocks on mapped slots as in use (the `alloc` of an engine that picks its
        own block ids; see `map_slots`). Nothing is mapped here.

        Raises:
            KVCacheFull: The model is asleep (reason "asleep"); nothing is taken.
            ValueError: A block is not free on a mapped slot (`BlockAllocator.take`); nothing is taken.
        """
        if self._closed:
            raise RuntimeError("the KV cache is closed")
        if self._asleep:
            raise KVCacheFull(len(block_ids), 0, "asleep", "the model is asleep: wait for kvctl wake")
        with self._lock:
            self.allocator.take(block_ids)

    @property
    def target_pages(self) -> int:
        """Pages the daemon wants this cache to hold at most now: -1 for no target, 0 while asleep."""
        return self._effective_target()

    # ---- growth ----

    def _maybe_wake_locked(self) -> None:
        if self._thread is not None and self.allocator.get_num_free_blocks() < self.low_watermark:
            self._notify()

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _grow_for(self, blocks: int) -> tuple[str | None, str]:
        """Grow until `blocks` blocks are free, or growth is refused; return (reason, detail)."""
        with self._grow_lock:
            short = blocks - self.allocator.get_num_free_blocks()
            if short <= 0:
                return None, ""
            return self._grow_slots(-(-short // self.blocks_per_slot), self.grow_wait)

    def _grow_slots(self, slots: int, wait: float, targets: list[int] | None = None) -> tuple[str | None, str]:
        """Map `slots` more slots (called with the grow lock held); return (why short, detail).

        `targets` are the unmapped slots to map, in order (default: the lowest unmapped ones).
        """
        if targets is None:
            with self._lock:
                targets = self.allocator.get_unmapped_slots(slots)
        if not targets:
            return "capacity", f"all {self.max_slots} slots of the virtual capacity are mapped"
        per = self.pages_per_growth
        t0 = time.perf_counter()
        got = self.source.acquire(len(targets) * per, wait)
        usable = len(got.pages) // per
        if len(got.pages) % per:  # a partial growth unit is of no use: give it back
            self.source.release(got.pages[usable * per :])
        targets = targets[:usable]
        mapped: list[tuple[int, list, list[Mapping]]] = []
        try:
            for i, slot in enumerate(targets):
                pages = got.pages[i * per : (i + 1) * per]
                mapped.append((slot, pages, self._map_slot(slot, pages)))
            for start, count in _runs([slot for slot, _, _ in mapped]):
                for r in range(self.num_ranges):
                    offset = r * self.range_bytes + start * self.slot_bytes
                    self.device.set_access(self.reservation, offset, count * self.slot_bytes, Access.READ_WRITE)
        except BaseException:
            for _, _, mappings in mapped:
                for mapping in mappings:
                    mapping.close()
            self.source.release(got.pages[: usable * per])
            raise
        with self._lock:
            for slot, pages, mappings in mapped:
                self._slots[slot] = (pages, mappings)
                self.allocator.add_slot(slot)
        if mapped:
            self._stats["grows"] += 1
            self._stats["last_grow_s"] = time.perf_counter() - t0
            self._report_usage()
        if usable < slots:
            return got.denied or "capacity", got.detail
        return None, ""

    def _map_slot(self, slot: int, pages: list) -> list[Mapping]:
        mappings: list[Mapping] = []
        try:
            for r in range(self.num_ranges):
                for j in range(self.pages_per_slot):
                    offset = r * self.range_bytes + slot * self.slot_bytes + j * self.page_size
                    mappings.append(
                        self.device.map(self.reservation, offset, pages[r * self.pages_per_slot + j].physical)
                    )
        except BaseException:
            for mapping in mappings:
                mapping.close()
            raise
        return mappings

    # ---- shrink ----

    def _on_reclaim(self, pages: int, reason: str) -> None:
        # RECLAIM is budget pressure only; a lowered limit comes as POLICY's target (`_on_target`).
        self._reclaim_pages += pages
        self._notify()

    def _on_target(self, target_pages: int) -> None:
        self._target_pages = target_pages
        self._notify()

    # ---- sleep ----

    @property
    def asleep(self) -> bool:
        """Whether the model sleeps (from the sleep request until its wake is complete)."""
        return self._asleep

    def _queue_sleep_event(self, *event: Any) -> None:
        self._sleep_events.append(event)
        self._notify()

    def _handle_sleep_events(self) -> None:
        while self._sleep_events:
            kind, *args = self._sleep_events.popleft()
            if kind == "sleep":
                self._go_to_sleep(*args)
            elif kind == "restore":
                self._map_restored(*args)
            else:
                self._wake_up(*args)

    def _go_to_sleep(self, offload: bool) -> None:
        self._asleep = True
        self._run_hooks(self.sleep_hooks, offload)  # the engine stops admission, finishes or preempts work
        if not offload:
            self._discard_pending = True  # slots go back as they empty; see _run
            return
        with self.engine_lock, self._grow_lock:
            with self._lock:
                empty = set(self.allocator.get_empty_slots())
                for slot in empty:
                    self.allocator.remove_slot(slot)
            # Synchronize before unmapping: kernels issued on these blocks may still be running,
            # and cuMemUnmap does not wait for them.
            self.device.synchronize()
            returned, offloaded, offsets = [], [], []
            for slot, (pages, mappings) in sorted(self._slots.items()):
                for mapping in mappings:
                    mapping.close()
                if slot in empty:
                    returned.extend(pages)
                else:
                    # Mappings were made in page order, so pages[i] sits at mappings[i].offset.
                    offloaded.extend(pages)
                    offsets.extend(m.offset for m in mappings)
                    self._offloaded_slots.add(slot)
            self._slots.clear()
            if returned:
                self.source.release(returned)
            if offloaded:
                self.source.offload(offloaded, offsets)
            self._reported_used_slots = 0  # the daemon counts nothing in use once the pages left
            self._stats["shrinks"] += 1
        self.source.slept()

    def _map_restored(self, pages: list, offsets: list[int]) -> None:
        """Map pages handed back on wake at the offsets they were offloaded from."""
        for page, offset in zip(pages, offsets, strict=True):
            range_index, within = divmod(offset, self.range_bytes)
            slot, page_in_slot = divmod(within, self.slot_bytes)
            index = range_index * self.pages_per_slot + page_in_slot // self.page_size
            entries = self._restoring.setdefault(slot, [None] * self.pages_per_growth)
            if slot not in self._offloaded_slots or entries[index] is not None:
                logger.error("kvmem cache: a restored page for offset %d matches no offloaded page", offset)
                self.source.release([page])
                continue
            entries[index] = (page, self.device.map(self.reservation, offset, page.physical))

    def _wake_up(self, restored: bool) -> None:
        complete = all(slot in self._restoring and None not in self._restoring[slot] for slot in self._offloaded_slots)
        with self._grow_lock:
            if restored and complete:
                for start, count in _runs(sorted(self._offloaded_slots)):
                    for r in range(self.num_ranges):
                        offset = r * self.range_bytes + start * self.slot_bytes
                        self.device.set_access(self.reservation, offset, count * self.slot_bytes, Access.READ_WRITE)
                with self._lock:
                    for slot in self._offloaded_slots:
                        entries = self._restoring.pop(slot)
                        self._slots[slot] = ([p for p, _ in entries], [m for _, m in entries])
            elif self._offloaded_slots:
                # The saved cache is lost (or came back incomplete): every block is gone.
                restored = False
                partial = []
                for entries in self._restoring.values():
                    for entry in entries:
                        if entry is not None:
                            entry[1].close()
                            partial.append(entry[0])
                if partial:
                    self.source.release(partial)
                with self._lock:
                    self.allocator = BlockAllocator(self.blocks_per_slot, self.max_slots)
            self._restoring.clear()
            self._offloaded_slots.clear()
            self._discard_pending = False
            self._asleep = False
        self._report_usage()
        self._run_hooks(self.wake_hooks, restored)

    @staticmethod
    def _run_hooks(hooks: list[Callable[[bool], None]], value: bool) -> None:
        for hook in hooks:
            try:
                hook(value)
            except Exception:  # an engine's hook failing must not stop the sleep or wake itself
                logger.exception("kvmem cache: hook %r failed", hook)

    def _effective_target(self) -> int:
        return 0 if self._asleep else self._target_pages

    def _over_target(self) -> bool:
        held = len(self._slots) * self.pages_per_growth
        return 0 <= self._effective_target() < held

    def shrink(self, max_slots: int | None = None) -> int:
        """Unmap and return up to `max_slots` empty slots (all empty ones by default); how many."""
        with self.engine_lock:
            with self._grow_lock:
                with self._lock:
                    empty = self.allocator.get_empty_slots()
                    chosen = empty if max_slots is None else empty[:max_slots]
                    for slot in chosen:
                        self.allocator.remove_slot(slot)  # from here no alloc can hand out its blocks
                if not chosen:
                    return 0
                # Synchronize before unmapping: kernels issued on these blocks may still be running,
                # and cuMemUnmap does not wait for them.
                self.device.synchronize()
                returned = []
                for slot in chosen:
                    pages, mappings = self._slots.pop(slot)
                    for mapping in mappings:
                        mapping.close()
                    returned.extend(pages)
                self.source.release(returned)
                self._stats["shrinks"] += 1
                self._report_usage()
            if self.on_unmapped is not None:
                self.on_unmapped(chosen)
            return len(chosen)

    def compact(self) -> dict[int, int]:
        """Move live blocks off the emptiest slots into free blocks of the fullest, then give the
        emptied slots back; return ``{old block id: new block id}`` for every block moved.

        After it the cache maps its packed floor of slots (the fewest that hold its live blocks);
        the background thread may then map more to refill the low watermark. Contract: no work
        may use the cache during the call (it synchronizes the device before copying), and the
        engine must rewrite its block tables
        with the returned mapping before using a moved block: the old ids are free afterwards.
        """
        with self._grow_lock:
            with self._lock:
                usage = self.allocator.get_slot_usage()
                used = sum(count for _, count in usage)
                keep = {slot for slot, _ in usage[: -(-used // self.blocks_per_slot)]}
                movers = [
                    b
                    for slot, count in usage
                    if slot not in keep and count
                    for b in self.allocator.get_used_blocks(slot)
                ]
                if not movers:
                    return {}
                # The kept slots are the fullest in alloc's own order and have room for every
                # mover, so alloc hands out their free blocks only.
                targets = self.allocator.alloc(len(movers))
                if any(block // self.blocks_per_slot not in keep for block in targets):
                    self.allocator.free(targets)
                    raise RuntimeError("compaction found no room in the fullest slots (allocator order changed?)")
            self.device.synchronize()  # kernels still running may write the blocks being moved
            for r in range(self.num_ranges):
                base = self.reservation.address + r * self.range_bytes
                for src, dst in zip(movers, targets, strict=True):
                    self.device.copy_device_to_device(
                        base + dst * self.block_bytes, base + src * self.block_bytes, self.block_bytes
                    )
            self.device.synchronize()
            with self._lock:
                self.allocator.free(movers)
        self.shrink()
        return dict(zip(movers, targets, strict=True))

    def _shrink_as_asked(self) -> None:
        want_slots = 0
        if self._reclaim_pages > 0:
            want_slots = -(-self._reclaim_pages // self.pages_per_growth)
        if self._over_target():
            excess = len(self._slots) * self.pages_per_growth - self._effective_target()
            want_slots = max(want_slots, -(-excess // self.pages_per_growth))
        if want_slots:
            with self.engine_lock:
                short = want_slots - len(self.allocator.get_empty_slots())
                if short > 0 and self.evictor is not None and not self._asleep:
                    self.evictor(short)  # the engine frees what it can drop, so that slots empty
                done = self.shrink(want_slots)
            self._reclaim_pages = max(0, self._reclaim_pages - done * self.pages_per_growth)

    def _report_usage(self) -> None:
        """Tell the source how many pages hold live blocks, if that changed (not on the hot path)."""
        with self._lock:
            used_slots = self.allocator.get_num_mapped_slots() - len(self.allocator.get_empty_slots())
        if used_slots != self._reported_used_slots:
            self._reported_used_slots = used_slots
            self.source.report_usage(used_slots * self.pages_per_growth)

    # ---- background thread ----

    def _run(self) -> None:
        while not self._closed:
            with self._wake:
                self._wake.wait(timeout=0.05)
            if self._closed:
                return
            try:
                self._handle_sleep_events()
                self._report_usage()
                self._shrink_as_asked()
                if self._discard_pending and not self._slots:
                    self._discard_pending = False
                    self.source.slept()  # drained: every page is back
                if self._asleep:
                    continue
                surplus = self.allocator.get_num_free_blocks() - self.high_watermark
                if surplus >= self.blocks_per_slot:
                    # A whole slot or more beyond the high watermark: give empty slots back, so an
                    # idle cache shrinks to its live blocks plus the watermark. (Growth stops at the
                    # high watermark plus less than a slot, so the two never chase each other.)
                    self.shrink(surplus // self.blocks_per_slot)
                if self.allocator.get_num_free_blocks() < self.low_watermark and not self._over_target():
                    with self._grow_lock:
                        short = self.high_watermark - self.allocator.get_num_free_blocks()
                        if short > 0:
                            self._grow_slots(-(-short // self.blocks_per_slot), wait=0.0)
            except Exception:
                logger.exception("kvmem cache: background growth failed")
                time.sleep(0.5)

    # ---- lifecycle ----

    def stats(self) -> KVCacheStats:
        with self._lock:
            slots = len(self._slots)
            return KVCacheStats(
                mapped_bytes=slots * self.pages_per_growth * self.page_size,
                used_blocks=self.allocator.get_num_used_blocks(),
                free_blocks=self.allocator.get_num_free_blocks(),
                max_blocks=self.max_blocks,
                mapped_slots=slots,
                pages_held=slots * self.pages_per_growth,
                grows=self._stats["grows"],
                shrinks=self._stats["shrinks"],
                last_grow_s=self._stats["last_grow_s"],
            )

    def close(self) -> None:
        """Stop growing, unmap everything (after synchronizing) and return every page. Idempotent.

        The tensors `k` and `v` must not be used afterwards: their memory is unmapped.
        """
        if self._closed:
            return
        self._closed = True
        self._notify()
        if self._thread is not None:
            self._thread.join()
        with self._grow_lock:
            self.k = self.v = None  # the tensors must not outlive the mappings
            self.device.synchronize()
            returned = []
            for pages, mappings in self._slots.values():
                for mapping in mappings:
                    mapping.close()
                returned.extend(pages)
            for entries in self._restoring.values():
                for entry in entries:
                    if entry is not None:
                        entry[1].close()
                        returned.append(entry[0])
            self._slots.clear()
            self._restoring.clear()
            if returned:
                self.source.release(returned)
            self.reservation.close()

    def __enter__(self) -> ElasticKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of slot numbers as (start, length)."""
    runs: list[tuple[int, int]] = []
    for slot in sorted(slots):
        if runs and runs[-1][0] + runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((slot, 1))
    return runs
