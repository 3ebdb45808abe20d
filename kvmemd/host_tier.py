"""The host tier: where a sleeping model's KV pages wait, and the thread that copies them there and back.

Design note
-----------
`kvctl sleep MODEL --offload` keeps a model's KV cache across a sleep. The engine unmaps its pages
and sends them back with the byte offset each was mapped at (OFFLOAD); the daemon copies every page
into host memory it owns (pinned on CUDA: `Device.allocate_host_buffer`), then recycles the page
like any returned page. On wake it takes pages for the model through the normal arbitration, copies
the saved bytes into them and hands them back with their offsets (RESTORE), so the engine maps
each at the offset it had and its cache reads bit-identical.

Copies run on `COPY_WORKERS` worker threads, never on the event loop: a 2 MiB page takes a
fraction of a millisecond, but a model holds thousands. The daemon hands the tier a sleep's or a
wake's pages in batches of at most `BATCH_PAGES` (`kvmemd.sleep`), one job each, so that copies
are pipelined: while one batch is copied, the engine unmaps the next one (sleep) or maps the
previous one (wake), and the workers copy two batches at once (`Device.copy_device_to_host_many`
runs without the device lock; on the host device two memcpys use both cores). Each page is read
through (or written through) the daemon's own mapping of it (`kvmemd.pool`), so nothing is mapped
for a copy. A copy job finishes by queueing a completion that the event loop runs
(`run_completions`) after `notify()` wakes it: all accounting stays on the loop thread. Jobs may
complete out of order; each completion stands alone.

A page is owned by its copy job from the moment it leaves the engine (or the pool) until the job
completes: the loop neither lends it nor zeroes it meanwhile, so a restore can never write a
tenant's bytes into a page already zeroed for another.

Capacity: the tier holds at most `capacity` bytes; a sleep that would not fit is refused up front
(`room_pages`).

Memory. The tier holds one page-sized host buffer ("chunk") per saved page. A chunk freed by a
restore or discard is kept warm for `keep_warm_s` and reused by the next save: fresh host memory
is slow to fault in (measured here: 1 GiB of new anonymous memory took 0.5-1.5 s to touch, a
copy into memory already touched 0.2 s; benchmarks/bench_sleep.py), and on CUDA pinning is
slower still. Warm chunks left unused that long go back to the system (`trim`). Chunks are made
and freed on the copy workers, never on the event loop, which serves every other engine's grants
meanwhile: a save takes its warm chunks on the loop and its job makes the rest (a first
offloading sleep makes one per page, and on CUDA cuMemHostAlloc pins each; `bench_driver.py` times
it on a GPU), and `trim` hands the chunks it frees to a job.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvmem.device import Device, HostBuffer

logger = logging.getLogger(__name__)


class TierFullError(Exception):
    """The host tier has no room for the pages asked to be saved."""


KEEP_WARM_S = 30.0
# Threads copying at once. Two: on the host device one memcpy per core of a small machine; on a
# GPU each worker's synchronous cuMemcpy keeps the copy engine busy while the other thread does
# its Python work between pages.
COPY_WORKERS = 2
# Pages per copy job (32 MiB of 2 MiB pages): small enough that a sleep's first pages are copied
# while the engine still unmaps, and a wake's first pages mapped while the rest are copied; large
# enough that a job's fixed cost (a completion on the loop, a message) stays small per page.
BATCH_PAGES = 16


@dataclass
class SavedPage:
    """One page's bytes in the tier, in `chunk`; the engine had it mapped at `offset`."""

    chunk: HostBuffer
    offset: int


class HostTier:
    """Saved pages by model, and the copy worker. Methods are called from the event loop only.

    Args:
        device: The device whose pages are copied.
        page_size: Bytes per page.
        capacity: The most bytes the tier may hold at once.
        notify: Called (from the worker) when a completion is ready for `run_completions`.
    """

    def __init__(
        self,
        device: Device,
        page_size: int,
        capacity: int,
        notify: Callable[[], None],
        keep_warm_s: float = KEEP_WARM_S,
    ):
        self.device = device
        self.page_size = page_size
        self.capacity = capacity
        self.keep_warm_s = keep_warm_s
        self._notify = notify
        self._saved: dict[str, list[SavedPage]] = {}
        self._warm: list[tuple[float, HostBuffer]] = []  # (freed at, chunk); oldest first
        self.used_bytes = 0  # saved pages (and chunks being filled), at most `capacity`
        self.bytes_saved_total = 0
        self.bytes_restored_total = 0
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._completions: deque[Callable[[], None]] = deque()  # appended by the workers
        self._workers = [
            threading.Thread(target=self._run, name=f"kvmemd-host-tier-{i}", daemon=True) for i in range(COPY_WORKERS)
        ]
        for worker in self._workers:
            worker.start()

    # ---- event-loop side ----

    def room_pages(self) -> int:
        """Pages the tier can still take."""
        return (self.capacity - self.used_bytes) // self.page_size

    def saved_pages(self, model: str) -> int:
        return len(self._saved.get(model, ()))

    def save(
        self,
        model: str,
        addresses: list[int],
        offsets: list[int],
        done: Callable[[Exception | None], None],
    ) -> None:
        """Copy the pages at daemon `addresses` into the tier as `model`'s pages at `offsets`.

        `done(error)` runs on the loop once the copies are over (error None on success; on an
        error nothing of this batch is kept). The caller must not lend or zero the pages before.

        A host without memory for the batch's new chunks (`kvmem.device.OutOfMemoryError`) fails
        the batch like a failed copy: through `done`.

        Raises:
            TierFullError: The batch would take the tier over its capacity (nothing was started).
        """
        size = len(addresses) * self.page_size
        if self.used_bytes + size > self.capacity:
            raise TierFullError(f"the host tier holds {self.used_bytes} of {self.capacity} bytes; {size} more needed")
        # Warm chunks now (the warm list is the loop's); the job makes the rest and appends them to
        # `chunks`, which the loop reads again only in `finish`, after the job.
        chunks = [self._warm.pop()[1] for _ in range(min(len(addresses), len(self._warm)))]
        self.used_bytes += size

        def copy() -> None:
            while len(chunks) < len(addresses):
                chunks.append(self.device.allocate_host_buffer(self.page_size))
            self.device.copy_device_to_host_many([(c.array, a) for c, a in zip(chunks, addresses, strict=True)])

        def finish(error: Exception | None) -> None:
            if error is None:
                entries = [SavedPage(chunk, offset) for chunk, offset in zip(chunks, offsets, strict=True)]
                self._saved.setdefault(model, []).extend(entries)
                self.bytes_saved_total += size
            else:  # (chunks made before an allocation failed are kept warm all the same)
                self._give_back(chunks, size)
            done(error)

        self._submit(f"saving {len(addresses)} pages of {model}", copy, finish)

    def restore(
        self,
        model: str,
        addresses: list[int],
        done: Callable[[list[int], Exception | None], None],
    ) -> None:
        """Copy `len(addresses)` of `model`'s saved pages into the pages at daemon `addresses`.

        `done(offsets, error)` runs on the loop: `offsets[i]` is where the engine mapped the page
        now at `addresses[i]`. The restored pages leave the tier (their buffers are freed once
        empty) whether or not the copies succeed.
        """
        saved = self._saved.get(model, [])
        if len(addresses) > len(saved):
            raise ValueError(f"{len(addresses)} pages to restore, but {model!r} has {len(saved)} saved")
        entries, self._saved[model] = saved[: len(addresses)], saved[len(addresses) :]
        if not self._saved[model]:
            del self._saved[model]

        def copy() -> None:
            self.device.copy_host_to_device_many([(a, e.chunk.array) for e, a in zip(entries, addresses, strict=True)])

        def finish(error: Exception | None) -> None:
            if error is None:
                self.bytes_restored_total += len(entries) * self.page_size
            self._give_back([entry.chunk for entry in entries], len(entries) * self.page_size)
            done([entry.offset for entry in entries], error)

        self._submit(f"restoring {len(addresses)} pages of {model}", copy, finish)

    def discard(self, model: str) -> int:
        """Forget `model`'s saved pages (their contents are lost); how many there were."""
        entries = self._saved.pop(model, [])
        self._give_back([entry.chunk for entry in entries], len(entries) * self.page_size)
        return len(entries)

    @property
    def warm_bytes(self) -> int:
        """Host memory kept for reuse by the next save (not counted in `used_bytes`)."""
        return len(self._warm) * self.page_size

    def trim(self, now: float | None = None) -> int:
        """Free warm chunks unused for `keep_warm_s`, on a copy worker (on CUDA each is unpinned);
        how many."""
        now = time.monotonic() if now is None else now
        expired = 0
        while expired < len(self._warm) and now - self._warm[expired][0] >= self.keep_warm_s:
            expired += 1
        if expired:
            chunks = [chunk for _, chunk in self._warm[:expired]]
            del self._warm[:expired]

            def free() -> None:
                for chunk in chunks:
                    chunk.close()

            # (a chunk that fails to free is logged by the job; the device frees it when it closes)
            self._submit(f"freeing {expired} warm chunks", free, lambda error: None)
        return expired

    def run_completions(self) -> None:
        """Run the completions of finished jobs (on the event loop)."""
        while self._completions:
            self._completions.popleft()()

    def close(self) -> None:
        """Finish queued jobs, run their completions, free every buffer. Idempotent."""
        for _ in self._workers:
            self._jobs.put(None)  # each worker takes one and stops, after the jobs queued before
        for worker in self._workers:
            worker.join()
        self.run_completions()
        for model in list(self._saved):
            self.discard(model)
        for _, chunk in self._warm:
            chunk.close()
        self._warm.clear()

    # ---- internals ----

    def _submit(self, what: str, copy: Callable[[], None], finish: Callable[[Exception | None], None]) -> None:
        """Run `copy` on the worker, then `finish(error)` on the loop (via `run_completions`)."""

        def job() -> None:
            error: Exception | None = None
            started = time.perf_counter()
            try:
                copy()
            except Exception as exc:  # a device error: reported to the loop, never kills the worker
                logger.exception("host tier: %s failed", what)
                error = exc
            logger.debug("host tier: %s took %.1f ms", what, (time.perf_counter() - started) * 1e3)

            self._completions.append(lambda: finish(error))
            self._notify()

        self._jobs.put(job)

    def _give_back(self, chunks: list[HostBuffer], counted: int) -> None:
        """`counted` bytes of the tier are free again, and `chunks` hold no saved page: they are
        kept warm for the next save (see `trim`)."""
        now = time.monotonic()
        self._warm.extend((now, chunk) for chunk in chunks)
        self.used_bytes -= counted

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
