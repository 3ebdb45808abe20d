"""Where an elastic KV cache gets its physical pages: the daemon, or the process itself.

`DaemonPageSource` asks kvmemd (pages shared with other models under the daemon's limits);
`LocalPageSource` creates pages on an in-process device under a budget (single-model use, tests).
Both give pages as objects with a `physical` attribute (a `kvmem.device.PhysicalPage`).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvmem.client import DaemonClient, Policy
from kvmem.device import Device, OutOfMemoryError, PhysicalPage


@dataclass
class LocalPage:
    id: int
    physical: PhysicalPage


@dataclass
class Acquired:
    """Pages obtained, and why there are fewer than asked (None when all came)."""

    pages: list
    denied: str | None = None
    detail: str = ""


class PageSource(Protocol):
    device: Device
    page_size: int
    # Set by the cache: f(pages, reason) when pages are asked back; f(target_pages) on a new target;
    # f(offload) when the operator puts the model to sleep; f(pages, offsets) when offloaded pages
    # come back; f(restored) when the operator wakes the model. (Called on the client's reader
    # thread: they only queue work.)
    on_reclaim: Callable[[int, str], None] | None
    on_target: Callable[[int], None] | None
    on_sleep: Callable[[bool], None] | None
    on_restore: Callable[[list, list[int]], None] | None
    on_wake: Callable[[bool], None] | None

    def acquire(self, n: int, wait: float) -> Acquired: ...

    def sure_pages(self) -> int: ...

    def release(self, pages: list) -> None: ...

    def offload(self, pages: list, offsets: list[int]) -> None: ...

    def describe(self, layout: dict) -> None: ...

    def report_usage(self, used_pages: int) -> None: ...

    def slept(self) -> None: ...

    def close(self) -> None: ...


class LocalPageSource:
    """Pages created on `device` in this process, at most `budget_pages` at a time."""

    def __init__(self, device: Device, budget_pages: int, owns_device: bool = True):
        if budget_pages < 1:
            raise ValueError(f"a budget of {budget_pages} pages holds nothing")
        self.device = device
        self.page_size = device.granularity
        self.budget_pages = budget_pages
        self.on_reclaim = None
        self.on_target = None
        self.on_sleep = self.on_restore = self.on_wake = None  # no operator without a daemon
        self._owns_device = owns_device
        self._held: dict[int, LocalPage] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def acquire(self, n: int, wait: float) -> Acquired:
        pages = []
        with self._lock:
            room = self.budget_pages - len(self._held)
            for _ in range(min(n, room)):
                try:
                    page = LocalPage(next(self._ids), self.device.create_page(self.page_size))
                except OutOfMemoryError as exc:
                    return self._record(pages, Acquired(pages, "budget", f"device out of memory: {exc}"))
                pages.append(page)
            if len(pages) < n:
                return self._record(pages, Acquired(pages, "budget", f"the local budget of {self.budget_pages} pages"))
            return self._record(pages, Acquired(pages))

    def sure_pages(self) -> int:
        """Pages `acquire` is sure to grant now: what is left of the budget (no one else takes from it)."""
        with self._lock:
            return max(0, self.budget_pages - len(self._held))

    def _record(self, pages: list[LocalPage], result: Acquired) -> Acquired:
        for page in pages:
            self._held[page.id] = page
        return result

    def release(self, pages: list) -> None:
        with self._lock:
            for page in pages:
                del self._held[page.id]
                page.physical.close()

    def offload(self, pages: list, offsets: list[int]) -> None:
        raise RuntimeError("a local page source has no host tier to offload to: connect to kvmemd")

    def describe(self, layout: dict) -> None:
        return None  # no one else to tell

    def report_usage(self, used_pages: int) -> None:
        return None  # no one else to tell

    def slept(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            for page in self._held.values():
                page.physical.close()
            self._held.clear()
        if self._owns_device:
            self.device.close()


class DaemonPageSource:
    """Pages lent by kvmemd through a `DaemonClient`."""

    def __init__(self, client: DaemonClient):
        self.client = client
        self.device = client.device
        self.page_size = client.page_size
        self.on_reclaim = None
        self.on_target = None
        self.on_sleep = None
        self.on_restore = None
        self.on_wake = None
        client.on_reclaim = lambda pages, reason: self.on_reclaim and self.on_reclaim(pages, reason)
        client.on_policy = self._policy
        client.on_sleep = self._sleep
        client.on_restore = lambda pages, offsets: self.on_restore and self.on_restore(pages, offsets)
        client.on_wake = lambda restored: self.on_wake and self.on_wake(restored)

    def _sleep(self, offload: bool) -> None:
        if self.on_sleep is None:
            self.client.slept()  # no cache holds pages yet: asleep at once
        else:
            self.on_sleep(offload)

    def _policy(self, policy: Policy) -> None:
        if self.on_target is not None:
            self.on_target(policy.target_pages if policy.target_pages >= 0 else policy.limit_pages)

    def acquire(self, n: int, wait: float) -> Acquired:
        result = self.client.grow(n, wait=wait)
        return Acquired(result.pages, result.denied, result.detail)

    def sure_pages(self) -> int:
        """None are sure: the daemon weighs every request against its other models when it comes."""
        return 0

    def release(self, pages: list) -> None:
        self.client.return_pages(pages)

    def offload(self, pages: list, offsets: list[int]) -> None:
        self.client.offload_pages(pages, offsets)

    def describe(self, layout: dict) -> None:
        self.client.describe(layout)

    def report_usage(self, used_pages: int) -> None:
        self.client.report_usage(used_pages)

    def slept(self) -> None:
        self.client.slept()

    def close(self) -> None:
        self.client.close()
