"""The daemon's page pool: every physical page the daemon has made, and which are free.

Design note
-----------
Every page lives in the daemon's own virtual reservation at ``page_id * page_size``, mapped with
read/write access for as long as the page exists. That gives each page a small, stable id, lets
the daemon zero a page with one memset, and (later) copy it for offload, without mapping anything
on the grant path.

A page is FREE (in the warm reserve) or GRANTED (lent to a client). A free page is *clean*
(zeroed, or fresh from a driver that zeroes) or *dirty*: it holds the data of `owner`, the model
that last held it. A dirty page may go back to its owner as it is; it is zeroed before it goes to
anyone else, so one tenant's KV data never reaches another.

Slow device work (creating, zeroing, releasing pages) runs on one worker thread, never on the
event loop:
- demand: the event loop declares how many pages waiting requests need (`set_demand`); the worker
  zeroes dirty pages, then creates pages (never beyond the budget) to meet it;
- refill: when the free pages fall below `reserve_low`, it creates pages up to `reserve_high`,
  and keeps at least `reserve_low` of them clean by zeroing dirty ones;
- trim: when the free pages stay above `reserve_high` for `release_after` seconds, it releases
  the surplus to the driver (dirty pages first: they would need zeroing anyway), so memory goes
  back to the rest of the GPU.
After any page becomes grantable the worker calls `notify()` so the event loop serves waiters.

Invariant (under `_lock`): every page id is in exactly one of `_clean`, `_dirty[owner]`,
`_granted`, or `_busy` (being created, zeroed or released by the worker); `len(pages)` plus the
pages being created never exceeds the budget, except for pages adopted after a restart.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmem.device import Device, Mapping, OutOfMemoryError, PhysicalPage

logger = logging.getLogger(__name__)

# After the driver reports out-of-memory below our budget (other GPU users hold memory), or a
# device call fails, the worker waits this long before trying again.
OOM_BACKOFF_S = 1.0


@dataclass
class Page:
    id: int
    physical: PhysicalPage
    mapping: Mapping
    owner: str | None = None  # model whose data the page may hold; None once zeroed
    holder: int | None = None  # client id while granted


@dataclass(frozen=True)
class PoolStats:
    budget_pages: int
    created: int
    free_clean: int
    free_dirty: int
    granted: int
    busy: int
    pages_created_total: int
    pages_released_total: int
    pages_scrubbed_total: int
    out_of_memory_total: int


class PagePool:
    """See the module docstring.

    Args:
        device: The device pages are made on.
        page_size: Bytes per page, a multiple of the device's granularity.
        budget_pages: The most pages that may exist at once.
        reserve_low: Refill when fewer free pages than this remain.
        reserve_high: Refill up to this; release surplus above it after `release_after` seconds.
        release_after: Seconds the free pages must stay above `reserve_high` before a trim.
        notify: Called (from the worker thread) when pages became grantable.
        max_pages: Size of the daemon's virtual reservation in pages (budget plus room for
            pages adopted after a restart).
    """

    def __init__(
        self,
        device: Device,
        page_size: int,
        budget_pages: int,
        reserve_low: int,
        reserve_high: int,
        release_after: float,
        notify: Callable[[], None],
        max_pages: int | None = None,
    ):
        if budget_pages < 1:
            raise ValueError(f"budget of {budget_pages} pages: it must allow at least one page")
        if not 0 <= reserve_low <= reserve_high:
            raise ValueError(f"reserve watermarks low={reserve_low} high={reserve_high} must satisfy 0 <= low <= high")
        self.device = device
        self.page_size = page_size
        self.budget_pages = budget_pages
        self.reserve_low = min(reserve_low, budget_pages)
        self.reserve_high = min(reserve_high, budget_pages)
        self.release_after = release_after
        self.max_pages = max_pages or 2 * budget_pages + 1024
        self._notify = notify
        self.reservation = device.reserve(self.max_pages * page_size)

        self._lock = threading.Condition()
        self.pages: dict[int, Page] = {}
        self._clean: list[int] = []  # a stack: the most recently zeroed page goes first
        self._dirty: dict[str, list[int]] = {}
        self._granted: set[int] = set()
        self._busy: set[int] = set()
        self._free_ids: list[int] = []  # a heap: low ids first keeps the daemon's range compact
        self._next_id = 0
        self._creating = 0
        self._scrubbing = 0
        self._demand = 0
        self._refilling = True
        self._surplus_since: float | None = None
        self._oom_until = 0.0
        self._stop = False
        self._counters = {"created": 0, "released": 0, "scrubbed": 0, "oom": 0}
        self._worker = threading.Thread(target=self._run, name="kvmemd-pool", daemon=True)
        self._worker.start()

    # ---- event-loop side ----

    def take(self, model: str, client_id: int, n: int) -> list[Page]:
        """Up to `n` pages grantable to `model` now: its own dirty pages first, then clean ones."""
        with self._lock:
            taken: list[int] = []
            own = self._dirty.get(model)
            while own and len(taken) < n:
                taken.append(own.pop())
            if own is not None and not own:
                del self._dirty[model]
            while self._clean and len(taken) < n:
                taken.append(self._clean.pop())
            pages = []
            for page_id in taken:
                page = self.pages[page_id]
                page.owner, page.holder = model, client_id
                self._granted.add(page_id)
                pages.append(page)
            if taken:
                self._lock.notify()  # the reserve may need a refill
            return pages

    def give_back(self, page_ids: list[int], model: str) -> None:
        """Pages a client returned (or a dead client held): free, dirty with `model`'s data."""
        with self._lock:
            for page_id in page_ids:
                self._granted.remove(page_id)
                page = self.pages[page_id]
                page.owner, page.holder = model, None
                self._dirty.setdefault(model, []).append(page_id)
            self._lock.notify()

    def adopt(self, physical: PhysicalPage, model: str, client_id: int) -> Page:
        """Take over a page a client held across a daemon restart; it counts as created and granted.

        Raises:
            RuntimeError: The daemon's reservation has no room left.
        """
        with self._lock:
            page_id = self._allocate_id()
        try:
            mapping = self.device.map(self.reservation, page_id * self.page_size, physical)
            self.device.set_access(self.reservation, page_id * self.page_size, self.page_size)
        except BaseException:
            with self._lock:
                heapq.heappush(self._free_ids, page_id)
            raise
        with self._lock:
            page = Page(page_id, physical, mapping, owner=model, holder=client_id)
            self.pages[page_id] = page
            self._granted.add(page_id)
            return page

    def supply(self) -> tuple[int, dict[str, int]]:
        """Pages that can become grantable without asking anyone: (to anyone, dirty by owner).

        The first number counts clean free pages, pages being created or zeroed, and pages the
        budget still allows; the dict counts free dirty pages by the model whose data they hold
        (grantable to that model at once, to others once zeroed).
        """
        with self._lock:
            room = max(0, self.budget_pages - len(self.pages) - self._creating)
            anyone = len(self._clean) + self._creating + self._scrubbing + room
            return anyone, {owner: len(ids) for owner, ids in self._dirty.items()}

    def set_demand(self, pages: int) -> None:
        """Clean pages the waiting requests need beyond what is grantable now."""
        with self._lock:
            if pages != self._demand:
                self._demand = pages
                self._lock.notify()

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                budget_pages=self.budget_pages,
                created=len(self.pages),
                free_clean=len(self._clean),
                free_dirty=sum(len(ids) for ids in self._dirty.values()),
                granted=len(self._granted),
                busy=len(self._busy) + self._creating,
                pages_created_total=self._counters["created"],
                pages_released_total=self._counters["released"],
                pages_scrubbed_total=self._counters["scrubbed"],
                out_of_memory_total=self._counters["oom"],
            )

    def close(self) -> None:
        """Stop the worker; unmap and release every page the daemon holds. Idempotent.

        Granted pages stay alive in the clients that imported them.
        """
        with self._lock:
            if self._stop:
                return
            self._stop = True
            self._lock.notify()
        self._worker.join()
        self.device.synchronize()  # no zeroing may still run on pages about to be unmapped
        for page in list(self.pages.values()):
            page.mapping.close()
            page.physical.close()
        self.pages.clear()
        self.reservation.close()

    # ---- worker ----

    def _allocate_id(self) -> int:
        if self._free_ids:
            return heapq.heappop(self._free_ids)
        if self._next_id >= self.max_pages:
            raise RuntimeError(f"the daemon's reservation of {self.max_pages} pages is full")
        self._next_id += 1
        return self._next_id - 1

    def _free_count(self) -> int:
        return len(self._clean) + sum(len(ids) for ids in self._dirty.values())

    def _pop_dirty(self) -> int | None:
        for owner in list(self._dirty):
            ids = self._dirty[owner]
            page_id = ids.pop(0)  # the oldest: its owner is least likely to want it back
            if not ids:
                del self._dirty[owner]
            return page_id
        return None

    def _next_action(self) -> tuple[str, int | None]:
        """Pick the worker's next job (called with the lock held)."""
        now = time.monotonic()
        free = self._free_count()
        room = self.budget_pages - len(self.pages) - self._creating
        can_create = room > 0 and now >= self._oom_until
        if self._demand > len(self._clean):
            page_id = self._pop_dirty()
            if page_id is not None:
                return "scrub", page_id
            if can_create and self._demand > len(self._clean) + self._creating:
                return "create", None
        if free + self._creating < self.reserve_low:
            self._refilling = True
        if self._refilling:
            if free + self._creating >= self.reserve_high or room <= 0:
                self._refilling = False
            elif can_create:
                return "create", None
        if len(self._clean) < self.reserve_low:
            page_id = self._pop_dirty()
            if page_id is not None:
                return "scrub", page_id
        if free > self.reserve_high:
            if self._surplus_since is None:
                self._surplus_since = now
            if now - self._surplus_since >= self.release_after:
                page_id = self._pop_dirty()
                if page_id is None and self._clean:
                    page_id = self._clean.pop(0)  # the coldest clean page
                if page_id is not None:
                    return "release", page_id
        else:
            self._surplus_since = None
        return "wait", None

    def _run(self) -> None:
        while True:
            with self._lock:
                action, page_id = self._next_action()
                while action == "wait" and not self._stop:
                    self._lock.wait(timeout=self._wait_timeout())
                    action, page_id = self._next_action()
                if self._stop:
                    return
                if page_id is not None:
                    self._busy.add(page_id)
                if action == "create":
                    self._creating += 1
                elif action == "scrub":
                    self._scrubbing += 1
            try:
                if action == "create":
                    self._create()
                elif action == "scrub":
                    self._scrub(page_id)
                else:
                    self._release(page_id)
            except Exception:
                # A device failure here must not kill the worker: log it, put the page back
                # where it was, pause, and carry on; the event loop keeps serving what exists.
                logger.exception("page pool: %s failed", action)
                self._recover(action, page_id)
                time.sleep(OOM_BACKOFF_S)

    def _wait_timeout(self) -> float:
        if self._surplus_since is not None:
            return max(0.01, self.release_after - (time.monotonic() - self._surplus_since))
        if self._oom_until > time.monotonic():
            return self._oom_until - time.monotonic()
        return 1.0

    def _create(self) -> None:
        try:
            physical = self.device.create_page(self.page_size)
        except OutOfMemoryError:
            with self._lock:
                self._creating -= 1
                self._counters["oom"] += 1
                self._oom_until = time.monotonic() + OOM_BACKOFF_S
            logger.warning("device out of memory below the budget: %d pages exist", len(self.pages))
            return
        with self._lock:
            page_id = self._allocate_id()
        try:
            offset = page_id * self.page_size
            mapping = self.device.map(self.reservation, offset, physical)
            self.device.set_access(self.reservation, offset, self.page_size)
            if not self.device.zeroes_new_pages:
                # The driver does not promise zeroed memory: it may hold another process's data.
                self.device.memset(mapping.address, 0, self.page_size)
                self.device.synchronize()
        except BaseException:
            physical.close()
            with self._lock:
                self._creating -= 1
                heapq.heappush(self._free_ids, page_id)
            raise
        with self._lock:
            self._creating -= 1
            self.pages[page_id] = Page(page_id, physical, mapping)
            self._clean.append(page_id)
            self._counters["created"] += 1
        self._notify()

    def _scrub(self, page_id: int) -> None:
        page = self.pages[page_id]
        self.device.memset(page.mapping.address, 0, self.page_size)
        self.device.synchronize()  # zeroed for real before anyone else can be granted the page
        with self._lock:
            self._busy.discard(page_id)
            self._scrubbing -= 1
            page.owner = None
            self._clean.append(page_id)
            self._counters["scrubbed"] += 1
        self._notify()

    def _release(self, page_id: int) -> None:
        page = self.pages[page_id]
        # Synchronize before unmapping: a memset issued by this worker may still be running.
        self.device.synchronize()
        page.mapping.close()
        page.physical.close()
        with self._lock:
            self._busy.discard(page_id)
            del self.pages[page_id]
            heapq.heappush(self._free_ids, page_id)
            self._counters["released"] += 1

    def _recover(self, action: str, page_id: int | None) -> None:
        with self._lock:
            if action == "scrub":
                self._scrubbing -= 1
            if page_id is None:
                return
            self._busy.discard(page_id)
            page = self.pages.get(page_id)
            if page is None:
                return
            if page.owner is not None:
                self._dirty.setdefault(page.owner, []).append(page_id)
            else:
                self._clean.append(page_id)
