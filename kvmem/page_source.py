"""Where an elastic KV cache gets its physical pages: the daemon, or the process itself.

A page source lends `Page`s and tells one `PageListener` what its lender asks of them. Two
implement it: `kvmem.client.DaemonClient` (pages from kvmemd, shared with other models under the
daemon's limits) and `LocalPageSource` (pages created on an in-process device under a budget, for
single-model use and tests). Getting fewer pages than asked is an outcome, not an error: the
`Grant` says why in a `Shortfall`.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Protocol

from kvmem.device import Device, OutOfMemoryError, PhysicalPage


@dataclass
class Page:
    """A physical page lent to this process.

    Attributes:
        id: The lender's id for the page. A daemon client updates it in place when it re-registers
            its pages with a restarted daemon, so whoever holds the record keeps a valid id.
        physical: The page on the device, to map.
    """

    id: int
    physical: PhysicalPage


@dataclass(frozen=True)
class Shortfall:
    """Why fewer pages or blocks came than were asked for.

    Attributes:
        reason: One of the daemon's words (`kvmem.common.protocol.DENY_REASONS`: "limit", "budget",
            "asleep", "shutdown") or of the engine's own: "disconnected" (no daemon answered) and
            "capacity" (the cache's virtual capacity is fully mapped). A cache that sleeps answers
            "asleep" itself.
        detail: One line for a person, e.g. the limit that was hit.
    """

    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass
class Grant:
    """What `PageSource.acquire` got: the pages, and why they are fewer than asked (None if all came)."""

    pages: list[Page] = field(default_factory=list)
    shortfall: Shortfall | None = None


class PageListener(Protocol):
    """What a page source's lender asks of the pages' user (the cache). The source calls it on its
    own thread (a daemon client's reader thread): each method only queues work and returns."""

    def reclaim(self, pages: int, reason: str) -> None:
        """Give back about `pages` free pages (`reason`: "pressure", budget pressure from other models)."""

    def target(self, target_pages: int) -> None:
        """Hold at most `target_pages` pages from now on (-1: no target)."""

    def sleep(self, offload: bool) -> None:
        """The operator put the model to sleep; with `offload` pages with live data go back through
        `PageSource.offload` and come back through `restore` on wake."""

    def restore(self, pages: list[Page], offsets: list[int]) -> None:
        """Pages restored from the host tier on wake, each to be mapped at its offset (already held)."""

    def wake(self, restored: bool) -> None:
        """The operator woke the model; `restored` is False when an offloaded cache was lost."""


class PageSource(Protocol):
    """Lends pages. `device` is where they live, `page_size` their size in bytes, `budget_pages` the
    most it could ever lend (the daemon's whole budget, or the local budget): a cache's virtual size."""

    device: Device
    page_size: int
    budget_pages: int

    def listen(self, listener: PageListener) -> None:
        """Send the lender's requests to `listener` (one listener; the cache registers itself)."""

    def acquire(self, n: int, wait: float) -> Grant:
        """Up to `n` pages, waiting up to `wait` seconds; the pages are held from here on."""

    def acquire_ready(self, n: int) -> Grant:
        """Up to `n` of the pages the lender has ready now (made and free), waiting for none to be
        made or given back; the pages are held from here on. Fewer is the expected outcome."""

    def sure_pages(self) -> int:
        """Pages `acquire` is sure to grant now, whatever else happens (0 when it cannot know)."""

    def release(self, pages: list[Page]) -> None:
        """Give pages back. They must be unmapped, and no device work may touch them any more."""

    def offload(self, pages: list[Page], offsets: list[int]) -> None:
        """Give pages back during an offloading sleep; their contents come back on wake at `offsets`."""

    def describe(self, layout: dict) -> None:
        """Tell the lender how the cache is laid out (`KVLayout.to_dict()`)."""

    def report_usage(self, used_pages: int) -> None:
        """Tell the lender how many held pages hold live data."""

    def slept(self) -> None:
        """Tell the lender the model drained and gave its pages back after `PageListener.sleep`."""

    def declare_drain_hook(self) -> None:
        """Tell the lender the engine can drain (it registered a sleep hook): only then may it sleep."""

    def close(self) -> None:
        """Release every page still held and end the source."""


class LocalPageSource:
    """Pages created on `device` in this process, at most `budget_pages` at a time.

    No operator reaches a local source: its listener hears nothing (no reclaim, target, sleep).
    """

    def __init__(self, device: Device, budget_pages: int, owns_device: bool = True):
        if budget_pages < 1:
            raise ValueError(f"a budget of {budget_pages} pages holds nothing")
        self.device = device
        self.page_size = device.granularity
        self.budget_pages = budget_pages
        self._owns_device = owns_device
        self._held: dict[int, Page] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    @property
    def held_pages(self) -> int:
        """Pages lent and not released yet."""
        with self._lock:
            return len(self._held)

    def listen(self, listener: PageListener) -> None:
        return None  # nothing to tell it

    def acquire(self, n: int, wait: float) -> Grant:
        grant = Grant()
        with self._lock:
            room = self.budget_pages - len(self._held)
            try:
                for _ in range(min(n, room)):
                    grant.pages.append(Page(next(self._ids), self.device.create_page(self.page_size)))
            except OutOfMemoryError as exc:
                grant.shortfall = Shortfall("budget", f"device out of memory: {exc}")
            else:
                if len(grant.pages) < n:
                    grant.shortfall = Shortfall("budget", f"the local budget of {self.budget_pages} pages")
            for page in grant.pages:
                self._held[page.id] = page
        return grant

    def acquire_ready(self, n: int) -> Grant:
        """None: this source makes every page when asked (`acquire`), it keeps none made ahead."""
        return Grant()

    def sure_pages(self) -> int:
        """What is left of the budget: no one else takes from it."""
        with self._lock:
            return max(0, self.budget_pages - len(self._held))

    def release(self, pages: list[Page]) -> None:
        with self._lock:
            for page in pages:
                del self._held[page.id]
                page.physical.close()

    def offload(self, pages: list[Page], offsets: list[int]) -> None:
        raise RuntimeError("a local page source has no host tier to offload to: connect to kvmemd")

    def describe(self, layout: dict) -> None:
        return None  # no one else to tell

    def report_usage(self, used_pages: int) -> None:
        return None  # no one else to tell

    def slept(self) -> None:
        return None

    def declare_drain_hook(self) -> None:
        return None  # no operator without a daemon

    def close(self) -> None:
        with self._lock:
            for page in self._held.values():
                page.physical.close()
            self._held.clear()
        if self._owns_device:
            self.device.close()
