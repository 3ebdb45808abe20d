"""Sleep, offload and restore of an elastic KV cache (`kvctl sleep [--offload]`, `kvctl wake`).

The daemon's requests arrive on the page source's thread and are queued; the background thread
handles them in order. On sleep it first runs the engine's sleep hooks (stop admitting work,
finish or preempt what runs). Then:

- discard: empty slots go back as the engine frees its blocks (the growth policy's target is 0
  while asleep); once none is mapped, the cache says slept. The engine is expected to free every
  block in its hook (the contents are discarded).
- offload: every mapped slot is unmapped; slots with live blocks go to the daemon's host tier
  with the offset of each page, empty ones go back. The block allocator keeps its state, so the
  engine's block ids (and its prefix cache) stay valid. On wake the daemon hands pages back with
  those offsets; each is mapped where it was, and the cache reads bit-identical.

After the wake the hooks ``on_wake(restored)`` run; `restored` is False when an offloaded cache
was lost (or came back incomplete): then every block is freed and the engine must drop its ids.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from kvmem.cache.slots import MappedSlot
from kvmem.cache.state import CacheState
from kvmem.device import Mapping
from kvmem.page_source import Page

logger = logging.getLogger(__name__)

# Pages an offloading sleep unmaps before it hands them to the daemon (whole slots, at least one):
# the daemon copies one batch while the next is unmapped (kvmemd.host_tier copies 16 at a time).
OFFLOAD_BATCH_PAGES = 32


class SleepCycle:
    """The sleep and wake of one cache (see the module docstring).

    Attributes:
        sleep_hooks: ``f(offload)``, run on sleep before any page goes back (the engine's drain).
        wake_hooks: ``f(restored)``, run once the cache is usable again.
    """

    def __init__(
        self,
        state: CacheState,
        sleep_hooks: Iterable[Callable[[bool], None]],
        wake_hooks: Iterable[Callable[[bool], None]],
    ):
        self.state = state
        self.sleep_hooks: list[Callable[[bool], None]] = list(sleep_hooks)
        self.wake_hooks: list[Callable[[bool], None]] = list(wake_hooks)
        self._events: deque[tuple[Any, ...]] = deque()  # from the source's thread, in order
        self._discard_pending = False  # a discarding sleep waits for the slots to empty
        self._offloaded_slots: set[int] = set()  # slots whose pages are in the host tier
        # During a wake: slot -> per page of the slot, (page, mapping) once restored, else None.
        self._restoring: dict[int, list[tuple[Page, Mapping] | None]] = {}

    def queue(self, *event: Any) -> None:
        """Queue ``("sleep", offload)``, ``("restore", pages, offsets)`` or ``("wake", restored)``."""
        self._events.append(event)
        self.state.notify()

    def handle_events(self) -> None:
        """Handle the queued requests in order (background thread)."""
        while self._events:
            kind, *args = self._events.popleft()
            if kind == "sleep":
                self._go_to_sleep(*args)
            elif kind == "restore":
                self._map_restored(*args)
            else:
                self._wake_up(*args)

    def finish_discard(self) -> None:
        """Say slept once a discarding sleep has every slot back (background thread)."""
        if self._discard_pending and not self.state.slots.mapped:
            self._discard_pending = False
            self.state.source.slept()  # drained: every page is back

    def _go_to_sleep(self, offload: bool) -> None:
        state = self.state
        state.asleep = True
        run_hooks(self.sleep_hooks, offload)  # the engine stops admission, finishes or preempts work
        with state.grow_lock:
            state.release_spare()
        if not offload:
            self._discard_pending = True  # slots go back as they empty (the target is 0 while asleep)
            return
        with state.engine.lock, state.grow_lock:  # lock order: engine, grow, allocator (kvmem.cache.state)
            empty = set(state.allocator.remove_empty_slots())
            # Pipelined: each batch goes to the daemon as soon as it is unmapped, so the daemon
            # copies it to its host tier while the next batch is unmapped here.
            slots = sorted(state.slots.mapped)
            for batch in state.slots.unmap_in_batches(slots, OFFLOAD_BATCH_PAGES):
                returned: list[Page] = []
                offloaded: list[Page] = []
                offsets: list[int] = []
                for slot, entry in batch:
                    if slot in empty:
                        returned.extend(entry.pages)
                    else:
                        offloaded.extend(entry.pages)
                        offsets.extend(state.slots.page_offsets(slot))
                        self._offloaded_slots.add(slot)
                if returned:
                    state.source.release(returned)
                if offloaded:
                    state.source.offload(offloaded, offsets)
            state.forget_usage()  # the daemon counts nothing in use once the pages left
            state.counters.shrinks += 1
        state.source.slept()

    def _map_restored(self, pages: list[Page], offsets: list[int]) -> None:
        """Map pages handed back on wake at the offsets they were offloaded from (no access yet)."""
        slots = self.state.slots
        for page, offset in zip(pages, offsets, strict=True):
            slot, index = slots.page_index(offset)
            entries = self._restoring.setdefault(slot, [None] * slots.pages_per_growth)
            if slot not in self._offloaded_slots or entries[index] is not None:
                logger.error("kvmem cache: a restored page for offset %d matches no offloaded page", offset)
                self.state.source.release([page])
                continue
            entries[index] = (page, slots.map_page(offset, page))

    def _wake_up(self, restored: bool) -> None:
        state = self.state
        complete = all(slot in self._restoring and None not in self._restoring[slot] for slot in self._offloaded_slots)
        with state.grow_lock:
            if restored and complete:
                state.slots.allow_access(sorted(self._offloaded_slots))
                for slot in self._offloaded_slots:
                    entries = self._restoring.pop(slot)
                    state.slots.mapped[slot] = MappedSlot([p for p, _ in entries], [m for _, m in entries])
            elif self._offloaded_slots:
                # The saved cache is lost (or came back incomplete): every block is gone.
                restored = False
                partial = self.drop_restoring()
                if partial:
                    state.source.release(partial)
                state.allocator.reset()
            self._restoring.clear()
            self._offloaded_slots.clear()
            self._discard_pending = False
            state.asleep = False
        state.report_usage()
        run_hooks(self.wake_hooks, restored)

    def drop_restoring(self) -> list[Page]:
        """Unmap the pages a wake in progress has mapped so far (never accessible: no device work can
        touch them) and return them, for the caller to give back."""
        dropped = []
        for entries in self._restoring.values():
            for entry in entries:
                if entry is not None:
                    entry[1].close()
                    dropped.append(entry[0])
        self._restoring.clear()
        return dropped


def run_hooks(hooks: list[Callable[[bool], None]], value: bool) -> None:
    for hook in hooks:
        try:
            hook(value)
        except Exception:  # an engine's hook failing must not stop the sleep or wake itself
            logger.exception("kvmem cache: hook %r failed", hook)
