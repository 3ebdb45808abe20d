"""Sleep and wake for SGLang: the drain `kvctl sleep` needs, carried out on SGLang's scheduler thread.

Design note
-----------
kvmem puts a model to sleep only after the engine has drained: stopped admitting work and finished
or given up what runs, so that no kernel touches memory that is about to be unmapped (a model whose
engine declared no drain is refused by name). kvmem asks on its cache's background thread (the
sleep hook); SGLang's state belongs to its scheduler thread. So the hook only posts the request and
waits; the scheduler carries it out at the top of its next loop iteration and says when it is done.

Where. `Scheduler.ingest_requests` runs once per iteration of every SGLang event loop (normal and
overlap), also while the engine is paused; SGLang 0.5.23 documents it as "the one place a new
per-iteration input source belongs" (sglang/srt/managers/scheduler.py). `install_scheduler_drain`
wraps it: after SGLang's own ingestion, `SchedulerDrain.run_pending` handles kvmem's requests. The
first call attaches the drain to the scheduler and declares the drain hook to the daemon for every
kvmem pool of the process (one scheduler per SGLang scheduler process).

What. Only SGLang's own control operations, the ones its HTTP server exposes
(/pause_generation, /flush_cache, /continue_generation):
- sleep: `Scheduler.pause_generation(mode="retract")` once for the first pool to sleep. The loop
  then skips scheduling and running batches (it only ingests); in overlap mode SGLang first
  processes the batch in flight; running requests and a chunked prefill are retracted to the
  waiting queue with their KV freed (they run again, recomputed, after the wake). With offload
  that is all: the prefix cache (the radix tree's pages) and the pool's padding page stay
  allocated, kvmem saves their slots to the daemon's host tier and maps them back where they were
  on wake, so the tree stays valid. Without offload the contents are discarded: `flush_cache`
  empties the radix tree and gives every page back (`allocator.clear`), and the pool releases its
  padding page, so every slot empties and kvmem can say slept.
- wake: the padding page is taken again (page 0: SGLang's dummy tokens write there), and if the
  saved cache was lost (`restored` False, kvmem freed every block) the allocator forgets its pages
  and `flush_cache` drops the radix tree that pointed at them. When no pool of the scheduler sleeps
  any more, `continue_generation` resumes, unless the engine was paused before kvmem paused it (an
  operator's /pause_generation is left as it was).
- an operator's /continue_generation while a pool sleeps: its memory is gone (offloaded, or given
  back), so the engine is paused again in the iteration that handled the request, before anything
  is scheduled (`_pause_again`), and the wake resumes it.
A flush SGLang refuses (it still has work holding KV, e.g. requests waiting for a grammar) is
tried again at most every `RETRY_S` while the engine stays paused; the sleep hook has returned by
then, so kvmem keeps waiting for its slots to empty, and the daemon rolls a drain that does not
finish within its drain timeout back to awake (the wake then resumes the engine as it was). A wake
step that cannot be done yet (a flush refused, the padding page denied by the daemon) is retried the
same way, the engine staying paused until it is done.

Not drained: tensor or pipeline parallelism and DP attention. Their ranks must pause on the same
iteration (SGLang broadcasts each iteration's inputs from rank 0), but each rank's pool sleeps when
its own GPU's daemon says so; a rank pausing alone would stall the others in their collectives. No
drain hook is declared there, so the daemon refuses to put such a model to sleep, by name.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

from kvmem.integrations.sglang.pool import KvmemMHATokenToKVPool

logger = logging.getLogger(__name__)

# A sleep that waits for the scheduler says what it waits for this often.
DRAIN_LOG_S = 10.0
# A drain step SGLang cannot do yet (a flush it refuses, a page the daemon denies) is tried again
# this often, not on every scheduler iteration (each refused flush logs a warning).
RETRY_S = 0.5
_SCHEDULER_MODULE = "sglang.srt.managers.scheduler"


@dataclass
class DrainRequest:
    """One sleep or wake of one pool, queued for the scheduler thread.

    Attributes:
        kind: "sleep" or "wake".
        pool: The pool whose kvmem cache sleeps or wakes.
        flag: ``offload`` for a sleep, ``restored`` for a wake.
        done: Set by the scheduler thread when carried out (or by `SchedulerDrain.abandon`).
    """

    kind: str
    pool: KvmemMHATokenToKVPool
    flag: bool
    done: bool = False


class SchedulerDrain:
    """kvmem's sleep and wake for the pools of one SGLang scheduler; see the module docstring.

    Made by `drain_for`, with the kvmem pools it drains (none where SGLang cannot be drained).
    """

    def __init__(self, scheduler, pools: list[KvmemMHATokenToKVPool]):
        self.scheduler = scheduler
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending: deque[DrainRequest] = deque()  # in order; the scheduler thread pops
        self._sleeping: set[KvmemMHATokenToKVPool] = set()  # this scheduler's pools that sleep
        self._resume_on_wake = False  # the engine ran before kvmem paused it
        self._discarding: list[KvmemMHATokenToKVPool] = []  # asleep without offload, not flushed yet
        self._retry_at = 0.0  # a step that could not be done is tried again from then
        for pool in pools:
            pool.drain = self
            pool.kv.add_sleep_hook(functools.partial(self._sleep_hook, pool))
            pool.kv.wake_hooks.append(functools.partial(self._wake_hook, pool))

    # ---- kvmem's side: the cache's background thread ----

    def _sleep_hook(self, pool: KvmemMHATokenToKVPool, offload: bool) -> None:
        """Post the sleep and wait until the scheduler has drained (or the pool closes)."""
        request = DrainRequest("sleep", pool, offload)
        with self._lock:
            self._pending.append(request)
            waited = 0.0
            while not request.done:
                if not self._changed.wait(timeout=DRAIN_LOG_S):
                    waited += DRAIN_LOG_S
                    logger.warning(
                        "kvmem: sleep waits %.0f s for SGLang's scheduler to drain (is its event loop running?)",
                        waited,
                    )

    def _wake_hook(self, pool: KvmemMHATokenToKVPool, restored: bool) -> None:
        """Post the wake; the engine stays paused until the scheduler has carried it out."""
        with self._lock:
            self._pending.append(DrainRequest("wake", pool, restored))

    def abandon(self, pool: KvmemMHATokenToKVPool) -> None:
        """The pool closes: requests for it are dropped, a sleep hook waiting for it returns."""
        with self._lock:
            for request in [r for r in self._pending if r.pool is pool]:
                self._pending.remove(request)
                request.done = True
            self._sleeping.discard(pool)
            if pool in self._discarding:
                self._discarding.remove(pool)
            self._changed.notify_all()

    # ---- SGLang's side: the scheduler thread ----

    def run_pending(self) -> None:
        """Carry out the queued requests in order, on the scheduler thread (`Scheduler.ingest_requests`
        calls this every iteration; see `install_scheduler_drain`). One that cannot be done yet stays
        first and is tried again after `RETRY_S`."""
        if self._sleeping and not self.scheduler._engine_paused:
            self._pause_again()
        if not self._pending and not self._discarding:
            return  # the common case: two checks per scheduler iteration
        now = time.monotonic()
        if now < self._retry_at:
            return
        while self._pending:
            request = self._pending[0]
            finished = self._sleep(request) if request.kind == "sleep" else self._wake(request)
            if not finished:
                self._retry_at = now + RETRY_S
                return
            with self._lock:
                if self._pending and self._pending[0] is request:  # `abandon` may have taken it
                    self._pending.popleft()
                request.done = True
                self._changed.notify_all()
        if self._discarding and not self._flush_discarding():
            self._retry_at = now + RETRY_S

    def _sleep(self, request: DrainRequest) -> bool:
        from sglang.srt.managers.io_struct import PauseGenerationReqInput

        scheduler, pool = self.scheduler, request.pool
        if not self._sleeping:
            # The first pool to sleep pauses the engine: SGLang retracts what runs (KV freed).
            # `_engine_paused` is how SGLang 0.5.23's scheduler records a pause (scheduler.py).
            self._resume_on_wake = not scheduler._engine_paused
            scheduler.pause_generation(PauseGenerationReqInput(mode="retract"))
        self._sleeping.add(pool)
        if not request.flag:  # discard: flushed now or on a later iteration (`_flush_discarding`)
            self._discarding.append(pool)
        return True  # with offload the tree's pages stay allocated and travel to the host tier

    def _pause_again(self) -> None:
        """An operator's /continue_generation resumed the engine while kvmem has it asleep: its KV
        memory is gone (offloaded, its radix tree still pointing there) or empty, so a batch now would
        read unmapped memory. It is paused again here, in the same iteration as SGLang handled the
        request (`ingest_requests`), before anything is scheduled; the wake resumes it."""
        from sglang.srt.managers.io_struct import PauseGenerationReqInput

        logger.warning(
            "kvmem: SGLang's generation was continued while kvmem has the model asleep (kvctl sleep): "
            "it stays paused until `kvctl wake`, and runs then"
        )
        self._resume_on_wake = True  # what the operator asked for, once there is memory again
        self.scheduler.pause_generation(PauseGenerationReqInput(mode="retract"))

    def _flush_discarding(self) -> bool:
        """Empty the radix tree and give every page back, padding pages included (a discarding sleep)."""
        if not self.scheduler.flush_cache(empty_cache=False):
            return False  # SGLang still has work holding KV (it logged what)
        for pool in self._discarding:
            if pool.padding_held:
                pool.release_padding_page()
        self._discarding.clear()
        return True

    def _wake(self, request: DrainRequest) -> bool:
        from sglang.srt.managers.io_struct import ContinueGenerationReqInput

        scheduler, pool = self.scheduler, request.pool
        if pool in self._discarding:
            self._discarding.remove(pool)  # the daemon rolled the sleep back before the flush
        if not request.flag:
            # kvmem freed every block: the allocator's pages, the padding page and the tree that
            # points at them are gone (after a discarding sleep there is nothing left to forget).
            pool.allocator.forget_pages()
            pool.forget_padding_page()
            if not scheduler.flush_cache(empty_cache=False):
                return False
            request.flag = True  # forgotten and flushed: not again when retried
        if not pool.padding_held and pool.take_padding_page() is not None:
            return False  # the daemon has no page for it now
        self._sleeping.discard(pool)
        if not self._sleeping and self._resume_on_wake:
            scheduler.continue_generation(ContinueGenerationReqInput(torch_empty_cache=False))
        return True


def drain_for(scheduler) -> SchedulerDrain:
    """The scheduler's drain, attached on first use to every open kvmem pool of this process that
    an allocator claimed (none where the ranks must pause together: see the module docstring)."""
    drain = getattr(scheduler, "_kvmem_drain", None)
    if drain is not None:
        return drain
    pools = [pool for pool in KvmemMHATokenToKVPool.open_pools() if pool.allocator is not None]
    args = getattr(scheduler, "server_args", None)
    parallel = {
        "tensor parallelism": getattr(scheduler, "tp_size", 1) > 1,
        "pipeline parallelism": getattr(args, "pp_size", 1) > 1,
        "DP attention": bool(getattr(args, "enable_dp_attention", False)),
    }
    why = [name for name, on in parallel.items() if on]
    if why and pools:
        logger.warning(
            "kvmem: SGLang with %s cannot be drained rank by rank: kvctl sleep refuses this model",
            " and ".join(why),
        )
        pools = []
    drain = SchedulerDrain(scheduler, pools)
    scheduler._kvmem_drain = drain
    return drain


def install_scheduler_drain() -> None:
    """Wrap `Scheduler.ingest_requests` so that every scheduler iteration runs kvmem's drain.

    Only in a process that has loaded SGLang's scheduler (where pools are built for one); idempotent.
    """
    module = sys.modules.get(_SCHEDULER_MODULE)
    if module is None:
        return
    scheduler_cls = module.Scheduler
    stock = scheduler_cls.ingest_requests
    if getattr(stock, "_kvmem_drain", False):
        return

    @functools.wraps(stock)
    def ingest_requests(self, *args, **kwargs):
        received = stock(self, *args, **kwargs)
        drain_for(self).run_pending()
        return received

    ingest_requests._kvmem_drain = True
    scheduler_cls.ingest_requests = ingest_requests
