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
any other model, so one tenant's KV data never reaches another.

Zeroing is not enough between users, though. A client that received a page's descriptor can keep
a duplicate of it (or keep its imported CUDA handle) after returning the page, and map it again
later: no one can revoke that. So a page is *tainted* by the uid of the first client that held
it, and is only ever lent to that uid again (a uid can read its own processes' memory anyway).
When a request of another uid needs room and only tainted pages are free, the worker releases
them to the driver and creates fresh pages: a kept reference then pins only the old memory, which
nobody else receives.

Slow device work (creating, zeroing, releasing pages) runs on one worker thread, never on the
event loop (the pages of a creation batch are made by `create_threads` threads at once, the
worker waiting for all of them):
- demand: the event loop declares, per uid, how many pages waiting requests still need
  (`set_demand`); the worker zeroes that uid's dirty pages, creates pages under the budget, or
  releases pages tainted by other uids to make room;
- refill: when the free pages fall below `reserve_low`, it creates pages up to `reserve_high`,
  and keeps some of them clean (the configured low watermark or one growth unit) by zeroing
  dirty ones, in batches, oldest first (the rest may go back to their owner with no zeroing);
- ahead of demand: the dirty pages of models with no engine attached (`set_attached`) are zeroed
  in batches, every one of them: their next holder is another model, or an engine starting afresh
  (before any refill: a page that exists is made grantable before a new one is made beside it);
- trim: when the free pages stay above `reserve_high` for `release_after` seconds, it releases
  the surplus to the driver (dirty pages first: they would need zeroing anyway), so memory goes
  back to the rest of the GPU.
After any page becomes grantable the worker calls `notify()` so the event loop serves waiters.

Reserve size. The watermarks given are a floor: the daemon raises them to what the attached
engines grow by, so that a growth finds its pages created and zeroed and neither cuMemCreate nor a
memset runs while it waits. Three measures, the largest wins:
- the growth unit (`set_growth_unit`): one slot of the largest attached engine's KV layout, one
  page per layer's K and V times the pages of a slot: low to one unit, high to two;
- the GROWs engines actually send (`note_grow`): an engine's cache grows by several slots at once
  while its demand rises, far more than one unit. The largest GROW of the last `release_after`
  seconds raises low to its size and high to twice it, so the next GROW of that size finds its
  pages and one more finds them while the first is refilled. An engine that leaves does not take
  its GROWs with it: the next one to start (a restart, another model on the pages it left) asks
  for as much, and its first burst finds them too.
- an engine's first burst (`set_growth_unit`'s `first_burst`): an engine that attached and has not
  yet sent a GROW of more than one growth unit has not met its first rising demand, and its first
  burst of requests will ask for up to `protocol.MAX_BURST_SLOTS` units at once. The reserve
  is raised to that burst (capped at the model's limit) from the moment its LAYOUT arrives: an
  engine starts serving well after it allocates its KV cache (`vllm serve` compiles and captures
  its CUDA graphs in between), so its first burst finds its pages made rather than waiting for a
  thousand cuMemCreate calls. It ends with the engine's first GROW of more than a unit, which
  `note_grow` then follows; an engine that never grows by more keeps a burst made while attached.
  All are bounded by the budget's free part (the budget less the pages granted).
The refill runs on the worker, after the waiting requests' demand, so it is ahead of demand and
never in a grant's way. When no GROW has needed the raised size for `release_after` seconds it
lapses, and the free pages above the lowered watermark are released after `release_after` more
seconds, like any surplus, so memory goes back to the rest of the GPU after an engine's burst.

Zeroing runs in batches of up to `SCRUB_BATCH` pages: one memset per page, then one synchronize
for the batch, and only then do the pages count as clean. The security invariant (a page that
changes tenant is zeroed before the new tenant can see it) is enforced in two places: `take`
hands a model only its own dirty pages or clean ones, and a page leaves `_dirty` for `_clean`
only in `_scrub`, after the synchronize that ends its memset (while zeroed it is in neither list,
so nothing can take it).

Each page's descriptor is exported once and kept (`export_fd`) when the fd limit allows, so a
grant costs no export call; the kernel duplicates the descriptor into the receiving process. The
worker exports a page as it makes it (a page adopted after a restart is exported at its first
grant), so the event loop makes no driver call to grant a page.

Invariant (under `_lock`): every page id is in exactly one of `_clean[uid]`, `_dirty[owner]`,
`_granted`, or among the pages the worker is zeroing or releasing; `len(pages)` plus the pages being
created never exceeds the budget, except for pages adopted after a restart.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvmem.common.undo import Undo
from kvmem.device import Device, Mapping, OutOfMemoryError, PhysicalPage

logger = logging.getLogger(__name__)

# After the driver reports out-of-memory below our budget (other GPU users hold memory), or a
# device call fails, the worker waits this long before trying again.
BACKOFF_S = 1.0
# The most pages zeroed together: their memsets are queued, then one synchronize ends them all.
SCRUB_BATCH = 32
# The most pages created together (their memsets, where needed, end with one synchronize).
CREATE_BATCH = 16
# Threads creating a batch's pages at once. cuMemCreate costs ~193 µs per 2 MiB page on an A100
# (kvcached's figure, DESIGN.md §8), a host page ~1 ms (the kernel zeroes it): at start, and on a
# large wake that needs pages made, creations in parallel end sooner where the driver (or the
# kernel) does not serialize them. Four: more than the cores of a small machine, few enough that
# the batch's mapping work (serialized on the device lock) is not starved.
CREATE_THREADS = 4


@dataclass
class Page:
    id: int
    physical: PhysicalPage
    mapping: Mapping
    uid: int | None = None  # the uid this page may be lent to (None: never lent yet)
    owner: str | None = None  # model whose data the page may hold; None once zeroed
    holder: int | None = None  # client id while granted
    export_fd: int | None = None  # the page's descriptor, exported once and kept


@dataclass(frozen=True)
class PoolStats:
    budget_pages: int
    created: int
    free_clean: int
    free_dirty: int
    granted: int
    pages_created_total: int
    pages_released_total: int
    pages_scrubbed_total: int
    out_of_memory_total: int
    pages_created_for_requests_total: int
    reserve_low: int
    reserve_high: int


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
        cache_exports: Keep one exported descriptor per page (needs an fd per page).
        create_threads: Threads that create pages at once (at start, and when demand or a large
            wake needs many pages).
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
        cache_exports: bool = True,
        create_threads: int = CREATE_THREADS,
    ):
        if budget_pages < 1:
            raise ValueError(f"budget of {budget_pages} pages: it must allow at least one page")
        if not 0 <= reserve_low <= reserve_high:
            raise ValueError(f"reserve watermarks low={reserve_low} high={reserve_high} must satisfy 0 <= low <= high")
        self.device = device
        self.page_size = page_size
        self.budget_pages = budget_pages
        self._reserve_floor = (reserve_low, reserve_high)
        self.reserve_low = min(reserve_low, budget_pages)
        self.reserve_high = min(reserve_high, budget_pages)
        self._clean_low = self.reserve_low
        self.release_after = release_after
        self.max_pages = max_pages or 2 * budget_pages + 1024
        self.cache_exports = cache_exports
        self._notify = notify
        self.reservation = device.reserve(self.max_pages * page_size)

        self._lock = threading.Condition()
        self.pages: dict[int, Page] = {}
        self._clean: dict[int | None, list[int]] = {}  # by taint uid; stacks: last zeroed first
        self._dirty: dict[str, list[int]] = {}  # by owner model; oldest first
        self._granted: set[int] = set()
        self._free_ids: list[int] = []  # a heap: low ids first keeps the daemon's range compact
        self._next_id = 0
        self._creating = 0
        self._scrubbing = 0
        self._releasing = 0  # pages the worker is releasing: in `pages`, in no list
        self._demand: dict[int, int] = {}
        self._attached: set[str] = set()  # models with an engine attached (see `set_attached`)
        self._growth_unit = 0  # pages of the largest attached engine's growth unit (`set_growth_unit`)
        self._first_burst = 0  # pages of the largest first burst still to come (`set_growth_unit`)
        # The GROWs of the last `release_after` seconds as a sliding-window maximum: (when it came,
        # pages), each larger than every later one, so the first is the largest.
        self._recent_grows: deque[tuple[float, int]] = deque()
        self._refilling = True
        self._surplus_since: float | None = None
        self._backoff_until = 0.0
        self._stop = False
        # "for_requests": pages created because waiting requests needed them (made on the grant path,
        # while a GROW waited), a part of "created"; the rest were made ahead, for the reserve.
        self._counters = {"created": 0, "for_requests": 0, "released": 0, "scrubbed": 0, "oom": 0}
        self._creators = ThreadPoolExecutor(max(1, create_threads), thread_name_prefix="kvmemd-pool-create")
        self._worker = threading.Thread(target=self._run, name="kvmemd-pool", daemon=True)
        self._worker.start()

    # ---- event-loop side ----

    def take(self, model: str, client_id: int, uid: int, n: int) -> list[Page]:
        """Up to `n` pages grantable now to `model` (run by `uid`).

        Order: the model's own dirty pages (no zeroing needed), then clean pages tainted by
        `uid`, then fresh clean pages. Pages tainted by another uid are never taken.
        """
        with self._lock:
            taken: list[int] = []
            own = self._dirty.get(model, [])
            keep = []
            while own and len(taken) < n:
                page_id = own.pop()
                (taken if self.pages[page_id].uid == uid else keep).append(page_id)
            own.extend(reversed(keep))
            if not own:
                self._dirty.pop(model, None)
            for key in (uid, None):
                stack = self._clean.get(key)
                while stack and len(taken) < n:
                    taken.append(stack.pop())
            pages = []
            for page_id in taken:
                page = self.pages[page_id]
                page.uid, page.owner, page.holder = uid, model, client_id
                self._granted.add(page_id)
                pages.append(page)
            if taken:
                # Pages taken for a waiting request no longer count as its demand, even before the
                # desk declares the new demand at the end of its pass: else the worker, reading the
                # old figure in between, makes pages nobody waits for.
                left = self._demand.get(uid, 0) - len(taken)
                if left > 0:
                    self._demand[uid] = left
                else:
                    self._demand.pop(uid, None)
                self._notify_worker_if_needed()
            return pages

    def export_fd(self, page: Page) -> tuple[int, bool]:
        """A descriptor of `page` to send: (fd, whether the caller must close it after sending)."""
        if not self.cache_exports:
            return page.physical.export().detach(), True
        if page.export_fd is None:
            page.export_fd = page.physical.export().detach()
        return page.export_fd, False

    def address_of(self, page_id: int) -> int:
        """Where page `page_id` is mapped in the daemon (read/write, for as long as it exists)."""
        return self.reservation.address + page_id * self.page_size

    def give_back(self, page_ids: list[int], model: str) -> None:
        """Pages a client returned (or a dead client held): free, dirty with `model`'s data."""
        if not page_ids:
            return  # (no empty list in `_dirty`: a model there has dirty pages)
        with self._lock:
            dirty = self._dirty.setdefault(model, [])
            for page_id in page_ids:
                self._granted.remove(page_id)
                page = self.pages[page_id]
                page.owner, page.holder = model, None
                dirty.append(page_id)
            if model not in self._attached:
                self._lock.notify()  # a dead engine's pages: the worker zeroes them ahead of their next holder
            else:
                self._notify_worker_if_needed()

    def _notify_worker_if_needed(self) -> None:
        """Wake the worker only when it has work (called with the lock held).

        Waking it on every grant and return would make the two threads trade the GIL on the
        grant path for nothing (measured: a third of a one-page grant's latency). This runs on every
        grant and return, so it reads counts only: the dirty pages of models with no engine attached,
        the one other job, are announced when they appear (`give_back`, `set_attached`).
        """
        free = self._free_count()
        if (
            self._demand
            or free + self._creating < self.reserve_low
            or (free > self.reserve_high and self._surplus_since is None)
            or (self._dirty and sum(len(ids) for ids in self._clean.values()) < self._clean_low)
        ):
            self._lock.notify()

    def adopt(self, physical: PhysicalPage, model: str, client_id: int, uid: int) -> Page:
        """Take over a page a client held across a daemon restart; it counts as created and granted.

        Raises:
            RuntimeError: The daemon's reservation has no room left.
        """
        with Undo() as undo:
            with self._lock:
                page_id = self._allocate_id()
            undo.push(self._free_id, page_id)
            mapping = self.device.map(self.reservation, page_id * self.page_size, physical)
            undo.push(mapping.close)
            self.device.set_access(self.reservation, page_id * self.page_size, self.page_size)
        with self._lock:
            page = Page(page_id, physical, mapping, uid=uid, owner=model, holder=client_id)
            self.pages[page_id] = page
            self._granted.add(page_id)
            return page

    def supply(self) -> tuple[int, int, int, int]:
        """Pages that can be granted without asking any client for pages back, in one locked read:
        (free, coming, created, granted), the last two as in `stats`.

        `free` counts every free page (a dirty or foreign-tainted one can be zeroed, or released and
        made anew), those being zeroed included: a batch of the worker's is free pages on their way to
        clean, a memset away, and a request due now (a GROW that does not wait) is granted them rather
        than denied while the refill happens to zero them (`take` hands them out once zeroed; the
        request waits for them as for any page it was granted and not given yet). `coming` counts
        pages being created and pages the budget still allows.
        """
        with self._lock:
            room = max(0, self.budget_pages - len(self.pages) - self._creating)
            return self._free_count() + self._scrubbing, self._creating + room, len(self.pages), len(self._granted)

    def set_demand(self, pages_by_uid: dict[int, int]) -> None:
        """Pages the waiting requests still need, by the uid asking."""
        with self._lock:
            demand = {uid: n for uid, n in pages_by_uid.items() if n > 0}
            if demand != self._demand:
                self._demand = demand
                self._lock.notify()

    def set_growth_unit(self, pages: int, first_burst: int = 0) -> None:
        """Size the warm reserve for engines that grow by `pages` pages at a time (0: none attached),
        the first burst of one of them still to come being `first_burst` pages (0: none).

        Low watermark: the configured one, one growth unit or the first burst, whichever is more;
        high: the configured one, two units or the first burst (raised further by recent GROWs, see
        `note_grow`). Never more than the budget's free part.
        """
        with self._lock:
            self._growth_unit = pages
            self._first_burst = first_burst
            watermarks = self.reserve_low, self.reserve_high, self._clean_low
            self._size_reserve(time.monotonic())
            if (self.reserve_low, self.reserve_high, self._clean_low) != watermarks:
                self._lock.notify()

    def note_grow(self, pages: int) -> None:
        """An engine asked for `pages` pages (a GROW): the reserve is raised to the largest such
        request of the last `release_after` seconds (see the module docstring), and the worker
        refills it ahead of the next one."""
        now = time.monotonic()
        with self._lock:
            grows = self._recent_grows
            largest = grows[0] if grows else None
            while grows and grows[-1][1] <= pages:
                grows.pop()  # never the largest again: this one is as large and lapses later
            grows.append((now, pages))
            if grows[0] is largest and now - largest[0] < self.release_after:
                return  # the window's largest GROW is the same: the watermarks are (this runs on every GROW)
            low, high = self.reserve_low, self.reserve_high
            self._size_reserve(now)
            if (self.reserve_low, self.reserve_high) != (low, high):
                self._lock.notify()

    def _size_reserve(self, now: float) -> None:
        """Set the reserve's watermarks from the floor, the growth unit and the GROWs that have not
        lapsed (lock held)."""
        grows = self._recent_grows
        while grows and now - grows[0][0] >= self.release_after:
            grows.popleft()
        grow = grows[0][1] if grows else 0
        floor_low, floor_high = self._reserve_floor
        unit, burst = self._growth_unit, self._first_burst
        room = max(0, self.budget_pages - len(self._granted))  # the budget's free part
        self.reserve_low = min(max(floor_low, unit, grow, burst), room)
        self.reserve_high = min(max(floor_high, 2 * unit, 2 * grow, burst), room)
        # The clean pages kept (attached models' own dirty pages zeroed for others) follow the floor,
        # the unit and a first burst (an engine starting afresh takes clean pages only); not the GROWs:
        # a model's large GROWs are best served by its own pages, unzeroed.
        self._clean_low = min(max(floor_low, unit, burst), room)

    def set_attached(self, models: set[str]) -> None:
        """The models whose engine is attached now: the dirty pages of all others are zeroed ahead."""
        with self._lock:
            self._attached = set(models)
            if any(owner not in self._attached for owner in self._dirty):
                self._lock.notify()

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                budget_pages=self.budget_pages,
                created=len(self.pages),
                free_clean=sum(len(ids) for ids in self._clean.values()),
                # Pages being zeroed are free, and dirty until their synchronize: no page goes missing.
                free_dirty=self._dirty_count() + self._scrubbing,
                granted=len(self._granted),
                pages_created_total=self._counters["created"],
                pages_released_total=self._counters["released"],
                pages_scrubbed_total=self._counters["scrubbed"],
                out_of_memory_total=self._counters["oom"],
                pages_created_for_requests_total=self._counters["for_requests"],
                reserve_low=self.reserve_low,
                reserve_high=self.reserve_high,
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
        self._creators.shutdown(wait=True)
        self.device.synchronize()  # no zeroing may still run on pages about to be unmapped
        for page in list(self.pages.values()):
            self._destroy(page)
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
        """Pages in the free lists, clean or dirty (lock held): by the invariant in the module note,
        every page that is neither granted nor being zeroed or released (counted, not summed: this
        runs on every grant and return)."""
        return len(self.pages) - len(self._granted) - self._scrubbing - self._releasing

    def _dirty_count(self) -> int:
        return sum(len(ids) for ids in self._dirty.values())

    def _pop_dirty(self, uid: int | None = None, other_than: int | None = None) -> int | None:
        """The oldest dirty page (of `uid`, or not of `other_than`, if given)."""
        for owner, ids in list(self._dirty.items()):
            for i, page_id in enumerate(ids):
                page_uid = self.pages[page_id].uid
                if (uid is None or page_uid == uid) and (other_than is None or page_uid != other_than):
                    del ids[i]
                    if not ids:
                        del self._dirty[owner]
                    return page_id
        return None

    def _pop_dirty_batch(self, n: int, uid: int | None = None) -> list[int]:
        """Up to `n` of the oldest dirty pages (of `uid`, if given)."""
        batch = []
        while len(batch) < n:
            page_id = self._pop_dirty(uid=uid)
            if page_id is None:
                break
            batch.append(page_id)
        return batch

    def _pop_clean(self, other_than: int | None = None) -> int | None:
        """The coldest clean page, tainted ones first (not of `other_than` nor fresh, if given)."""
        for key in sorted(self._clean, key=lambda k: (k is None, k or 0)):  # tainted pages first
            if other_than is not None and key in (other_than, None):
                continue
            stack = self._clean[key]
            if stack:
                page_id = stack.pop(0)
                if not stack:
                    del self._clean[key]
                return page_id
        return None

    def _next_action(self) -> tuple[str, int | list[int] | None]:
        """Pick the worker's next job (called with the lock held): how many pages to create, a batch
        of page ids to zero, a page id to release, or None to wait."""
        now = time.monotonic()
        # A raised reserve that lapsed makes its pages surplus like any other: they are released once
        # they have stayed above the lowered high watermark for `release_after` seconds (from now, not
        # from the GROW: pages an engine returned a moment ago may be the next engine's).
        self._size_reserve(now)
        free = self._free_count()
        room = self.budget_pages - len(self.pages) - self._creating
        can_act = now >= self._backoff_until
        fresh = len(self._clean.get(None, ()))
        for uid, want in self._demand.items():
            ready = fresh + len(self._clean.get(uid, ())) + self._creating + self._scrubbing
            if want <= ready or not can_act:
                continue
            batch = self._pop_dirty_batch(min(want - ready, SCRUB_BATCH), uid=uid)
            if batch:
                return "scrub", batch
            if room > 0:
                return "create for requests", min(want - ready, room, CREATE_BATCH)
            page_id = self._pop_dirty(other_than=uid)
            if page_id is None:
                page_id = self._pop_clean(other_than=uid)
            if page_id is not None:
                return "release", page_id  # tainted by another uid: make room for a fresh page
        # Before any refill: pages that exist but must be zeroed for their next holder are made
        # grantable first (a memset), rather than new ones made beside them (a creation and a memset,
        # and more memory taken from the GPU).
        for owner in self._dirty:
            if owner not in self._attached:  # its next holder is another model: zero ahead, in batches
                ids = self._dirty[owner]
                batch, ids[:] = ids[:SCRUB_BATCH], ids[SCRUB_BATCH:]
                if not ids:
                    del self._dirty[owner]
                return "scrub", batch
        if free + self._creating < self.reserve_low:
            self._refilling = True
        if self._refilling:
            if free + self._creating >= self.reserve_high or room <= 0:
                self._refilling = False
            elif can_act:
                return "create", min(self.reserve_high - free - self._creating, room, CREATE_BATCH)
        clean = sum(len(ids) for ids in self._clean.values())
        if clean < self._clean_low:
            batch = self._pop_dirty_batch(min(self._clean_low - clean, SCRUB_BATCH))  # one synchronize
            if batch:
                return "scrub", batch
        if free > self.reserve_high:
            if self._surplus_since is None:
                self._surplus_since = now
            if now - self._surplus_since >= self.release_after:
                page_id = self._pop_dirty()
                if page_id is None:
                    page_id = self._pop_clean()
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
                    if action in ("scrub", "release"):  # put it back: close() destroys every page
                        for one in page_id if action == "scrub" else [page_id]:
                            self._put_back(one)
                    return
                if action.startswith("create"):
                    self._creating += page_id  # for a creation: how many pages
                elif action == "scrub":
                    self._scrubbing += len(page_id)
                else:
                    self._releasing += 1
            try:
                if action.startswith("create"):
                    self._create(page_id, for_requests=action == "create for requests")
                elif action == "scrub":
                    self._scrub(page_id)
                else:
                    self._release(page_id)
            except Exception:
                # A device failure here must not kill the worker: log it, put the page back
                # where it was, and pause before trying anything again.
                logger.exception("page pool: %s failed", action)
                with self._lock:
                    if action == "scrub":
                        self._scrubbing -= len(page_id)
                        for one in page_id:  # still dirty: they go back as they were
                            self._put_back(one)
                    elif action == "release":
                        self._releasing -= 1
                        self._put_back(page_id)
                    self._backoff_until = time.monotonic() + BACKOFF_S

    def _free_id(self, page_id: int) -> None:
        with self._lock:
            heapq.heappush(self._free_ids, page_id)

    def _put_back(self, page_id: int) -> None:
        page = self.pages[page_id]
        if page.owner is not None:
            self._dirty.setdefault(page.owner, []).append(page_id)
        else:
            self._clean.setdefault(page.uid, []).append(page_id)

    def _wait_timeout(self) -> float:
        now = time.monotonic()
        if self._backoff_until > now:
            return self._backoff_until - now
        timeout = 1.0
        if self._surplus_since is not None:
            timeout = max(0.01, self.release_after - (now - self._surplus_since))
        if self._recent_grows:  # the largest GROW's raise lapses then
            timeout = min(timeout, max(0.01, self._recent_grows[0][0] + self.release_after - now))
        return timeout

    def _create(self, count: int, for_requests: bool = False) -> None:
        """Create `count` pages (counted in `_creating` by the caller): each made, mapped and given
        access one by one, then, where the driver does not promise zeros, every memset queued and one
        synchronize for the batch before any of them becomes grantable."""
        made: list[Page] = []
        try:
            # In parallel: creations run at once (Device.create_page takes no lock while it
            # allocates); mapping and setting access are short and take the device lock in turn.
            futures = [self._creators.submit(self._make_page) for _ in range(count)]
            failure: BaseException | None = None
            for future in futures:  # every one waited for, so none is left behind on an error
                try:
                    page = future.result()
                except BaseException as exc:
                    failure = failure or exc
                    continue
                if page is not None:  # None: out of memory, the backoff is set
                    made.append(page)
            if failure is not None:
                raise failure
            if made and not self.device.zeroes_new_pages:
                # The driver does not promise zeroed memory: it may hold another process's data.
                for page in made:
                    self.device.memset(page.mapping.address, 0, self.page_size)
                self.device.synchronize()
        except BaseException:
            self.device.synchronize()  # no memset may still run on the pages about to be released
            for page in made:
                self._destroy(page)
                self._free_id(page.id)
            made = []
            raise
        finally:
            with self._lock:
                self._creating -= count
                for page in made:
                    self.pages[page.id] = page
                    self._clean.setdefault(None, []).append(page.id)
                self._counters["created"] += len(made)
                if for_requests:
                    self._counters["for_requests"] += len(made)
        if made:
            self._notify()

    def _make_page(self) -> Page | None:
        """One new page, mapped in the daemon's reservation with access set; None if the device is out
        of memory (then the worker backs off)."""
        try:
            physical = self.device.create_page(self.page_size)
        except OutOfMemoryError:
            with self._lock:
                self._counters["oom"] += 1
                self._backoff_until = time.monotonic() + BACKOFF_S
            logger.warning("device out of memory below the budget: %d pages exist", len(self.pages))
            return None
        with Undo() as undo:
            undo.push(physical.close)  # after the unmap below: release while mapped would keep it alive
            with self._lock:
                page_id = self._allocate_id()
            undo.push(self._free_id, page_id)
            offset = page_id * self.page_size
            mapping = self.device.map(self.reservation, offset, physical)
            undo.push(mapping.close)
            self.device.set_access(self.reservation, offset, self.page_size)
            # Exported here, on the worker, rather than at the page's first grant on the event
            # loop: an export is a driver call under the device lock, which a copy worker may hold.
            export_fd = physical.export().detach() if self.cache_exports else None
        return Page(page_id, physical, mapping, export_fd=export_fd)

    def _scrub(self, page_ids: list[int]) -> None:
        """Zero a batch of dirty pages (taken off `_dirty` by the caller, so nothing can take them).

        Invariant: a page becomes clean (grantable to another model) only here, after the
        synchronize that ends its memset: zeroed for real before anyone else can be granted it.
        """
        pages = [self.pages[page_id] for page_id in page_ids]
        for page in pages:
            self.device.memset(page.mapping.address, 0, self.page_size)
        self.device.synchronize()  # one wait for the whole batch
        with self._lock:
            self._scrubbing -= len(pages)
            for page in pages:
                page.owner = None
                self._clean.setdefault(page.uid, []).append(page.id)
            self._counters["scrubbed"] += len(pages)
        self._notify()

    def _release(self, page_id: int) -> None:
        page = self.pages[page_id]
        # Synchronize before unmapping: a memset issued by this worker may still be running.
        self.device.synchronize()
        self._destroy(page)
        with self._lock:
            del self.pages[page_id]
            self._releasing -= 1
            heapq.heappush(self._free_ids, page_id)
            self._counters["released"] += 1
        self._notify()  # room was made: waiting requests may now get fresh pages

    def _destroy(self, page: Page) -> None:
        page.mapping.close()
        page.physical.close()
        if page.export_fd is not None:
            os.close(page.export_fd)
            page.export_fd = None
