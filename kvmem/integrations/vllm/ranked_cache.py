"""The scheduler's kvmem cache when vLLM's workers are processes of their own (multiprocess executor, TP>=1).

Design note
-----------
vLLM V1 keeps its scheduler, KV cache manager and block pool in the engine-core process; with the
multiprocess executor (every TP>1 engine, and vLLM's CPU platform even at TP=1) each rank's worker,
which holds that rank's KV tensors, is a process of its own. kvmem keeps one decision point and
one page path:

- **The block pool decides.** `KvmemBlockPool` (`pool`) is unchanged: it asks its cache to map
  the slots of the blocks it is about to hand out, counts only blocks on mapped slots, and gives
  slots back as they empty. Here its cache is a `RankedCache`: the pool's block accounting (a
  `BlockAllocator`, as inside `ElasticKVCache`) plus the set of slots mapped *on every rank*.
- **Each rank maps, from its own GPU's daemon.** Every worker has its own daemon session and
  cache (`rank`): pages go from a GPU's daemon to that rank's worker as descriptors and nowhere
  else. Each rank's memory is its own model entry in its GPU's `kvctl status`.
- **The decision travels on vLLM's own channel.** `map_slots` and unmapping are
  `MultiprocExecutor.collective_rpc` calls to every worker (method `kvmem_rank`, plain slot
  numbers). That is the message queue vLLM broadcasts each step's scheduler output on, and it is
  ordered: a map sent while the pool schedules a step is done on every rank before that step runs;
  an unmap is done after every step scheduled before it. `collective_rpc` first collects the
  replies of steps still in flight (`FutureWrapper.result`), so calling it between two
  asynchronously scheduled steps is safe. No channel of kvmem's own exists between the processes,
  and vLLM's queue never carries a page. (A KV connector's metadata, the other extension point,
  reaches the workers only with the step itself: too late to refuse a slot the step would use.)
- **A slot counts only when every rank has it.** A map's reply names the slots each rank got; the
  pool's count includes a slot only if all ranks mapped it, and the ranks that got a slot the others
  were denied unmap it at once. So no rank maps a slot the others lack for longer than that call,
  a denial on any rank makes the pool short exactly as a full pool is (vLLM queues or preempts),
  and nothing waits longer than the grant wait. Slots the pool names to map ahead of demand (from
  pages ready on each rank, `ElasticKVCache.map_slots`) are reconciled the same way; the demand is
  measured here, on the pool's blocks (`growth.DemandMeter`): no rank knows which blocks are used.
- **The daemons' wishes come back when asked, and the scheduler asks only when there is
  something to ask.** Targets (limits), reclaims and sleep/wake requests reach each rank's session;
  the scheduler asks the ranks for them (`maintain`, run on vLLM's engine thread: the tick thread
  puts a WAKEUP request with `TICK` on the engine core's input queue, vLLM's own way to wake an idle
  loop, and the engine thread handles it between steps). The tick thread looks every `TICK_S` and
  queues a tick only when a rank's entry in its daemon's status changed (`doorbell`: a limit, a
  reclaim, a sleep or wake, a reconnection), while a sleep drains, while a target or reclaim is
  unmet and blocks were freed since, when a slot or more of empty surplus waits to go back, or
  when the number of slots holding live blocks changed: each poll carries it, and each rank tells
  its daemon (a rank's cache holds every block of its mapped slots, so only the scheduler knows
  which are used: the daemon's USED figure and its choice of idle pages to ask back follow it).
  Asking blindly would keep every idle worker spinning (`doorbell`'s design note). The model's
  target is the smallest of its ranks' (a slot takes pages on every rank), reclaims the largest;
  the scheduler evicts cached blocks and unmaps empty slots to meet them.
- **Sleep drains the whole model.** A sleep request from any rank stops admission (the pool's
  drain); once no block is referenced the scheduler unmaps the empty slots (all of them when
  discarding) and tells the ranks `drained`, whose caches then offload or give back the rest and
  tell their daemons they slept. The model is awake again when every rank that slept has woken;
  if any rank lost its saved cache, every rank drops its slots and the pool its prefix cache.

Limits therefore apply per GPU, as everything in kvmem does: with TP=N each slot takes
`pages_per_slot` pages on each of the N GPUs, and the model holds as many slots as its tightest
GPU allows (README: "vLLM with tensor parallelism").
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kvmem.block_allocator import BlockAllocator
from kvmem.cache import growth
from kvmem.integrations.vllm.doorbell import DaemonDoorbell
from kvmem.integrations.vllm.geometry import UnsupportedVllmConfigError
from kvmem.page_source import Shortfall

logger = logging.getLogger(__name__)

TICK_S = 0.2  # how often the tick thread looks for work for `maintain` (module docstring)
# After the doorbell rang, ask this many times, a tick apart: a rank's reader thread may take a wish
# in just after the daemon published it (kvmem.integrations.vllm.doorbell).
DOORBELL_TICKS = 2
TICK = "kvmem-tick"  # the WAKEUP request's payload that asks the engine loop to run `maintain`
RPC_TIMEOUT_S = 120.0  # a rank that answers no command in this long is taken as failed
ASLEEP = Shortfall("asleep", "the model is asleep: wait for kvctl wake")

_engine_core: Any = None  # the engine core of this process (set before its scheduler is built)
_current: RankedCache | None = None


def bind_engine_core(engine_core: Any) -> None:
    """Remember the engine core being built in this process (its executor reaches the workers)."""
    global _engine_core
    _engine_core = engine_core


def executor() -> Any:
    """The bound engine core's multiprocess executor, or None (no engine core, or an in-process one)."""
    model_executor = getattr(_engine_core, "model_executor", None)
    if model_executor is None or not hasattr(model_executor, "rpc_broadcast_mq"):
        return None
    return model_executor


def worker_alignment() -> int:
    """vLLM blocks per kvmem page slot, as the workers computed it (1 when no worker says)."""
    model_executor = executor()
    if model_executor is None:
        return 1
    answers = set(model_executor.collective_rpc("kvmem_rank", args=("alignment",), timeout=RPC_TIMEOUT_S))
    if len(answers) != 1:
        raise UnsupportedVllmConfigError(f"kvmem: vLLM's ranks disagree on blocks per page slot: {sorted(answers)}")
    return answers.pop()


def for_scheduler(num_blocks: int) -> RankedCache:
    """The cache a block pool of `num_blocks` blocks gets in an engine core whose workers are processes.

    Raises:
        UnsupportedVllmConfigError: No multiprocess executor is bound, or the ranks disagree.
    """
    global _current
    model_executor = executor()
    if model_executor is None:
        raise UnsupportedVllmConfigError(
            "kvmem: vLLM's scheduler found no kvmem KV cache in its process and no multiprocess executor "
            "to reach its workers through"
        )
    if _current is not None:
        _current.close()
    _current = RankedCache(model_executor, num_blocks, getattr(_engine_core, "input_queue", None))
    return _current


class RankedCache:
    """The scheduler's view of its ranks' caches (see the module docstring).

    Offers what `KvmemBlockPool` uses of an `ElasticKVCache`. Every method runs on vLLM's engine
    thread (the pool's, and `maintain` from the input queue), the only thread that may use the
    executor.

    Args:
        model_executor: vLLM's `MultiprocExecutor`.
        num_blocks: The block pool's block count.
        input_queue: The engine core's input queue, for the tick (None: no tick, for tests).

    Raises:
        UnsupportedVllmConfigError: The ranks' caches differ in geometry or cannot hold `num_blocks`.
    """

    def __init__(self, model_executor: Any, num_blocks: int, input_queue: Any = None):
        self._executor = model_executor
        infos = self._rpc("describe")
        geometry = {(i["blocks_per_slot"], i["max_slots"], i["pages_per_slot"], i["page_size"]) for i in infos}
        if len(geometry) != 1:
            raise UnsupportedVllmConfigError(f"kvmem: vLLM's ranks have KV caches of different geometry: {geometry}")
        self.blocks_per_slot, self.max_slots, self.pages_per_growth, self.page_size = geometry.pop()
        self.max_blocks = self.blocks_per_slot * self.max_slots
        if self.max_blocks < num_blocks:
            raise UnsupportedVllmConfigError(
                f"kvmem: the ranks' caches hold {self.max_blocks} blocks, not the pool's {num_blocks}"
            )
        self.num_ranks = len(infos)
        self._allocator = BlockAllocator(self.blocks_per_slot, self.max_slots)
        self._demand = growth.DemandMeter(self._allocator, self.blocks_per_slot, self.blocks_per_slot)
        # Free blocks kept mapped after slots were mapped ahead of demand (what the demand uses in
        # `growth.HORIZON_S`), and when (`_headroom`: it lapses `growth.DECAY_S` after, as
        # ElasticKVCache's raised high watermark does).
        self._raised = (self.blocks_per_slot, float("-inf"))
        common = set.intersection(*(set(i["mapped"]) for i in infos))
        for slot in sorted(common):
            self._allocator.add_slot(slot)
        budgets = [i["budget_pages"] for i in infos]
        self._budget_pages = min(budgets) if min(budgets) >= 0 else -1
        self._target = -1
        self._reclaim = 0
        self._lock: Any = threading.RLock()
        self._evictor = None
        self._on_unmapped = None
        self._pool: Any = None
        self._sleeping: set[int] = set()  # ranks whose daemon asked for a sleep and did not wake yet
        self._offload = True
        self._restored = True
        self._drain_done = False
        self._closed = False
        self._doorbell = DaemonDoorbell()
        self._doorbell.watch([i.get("status") for i in infos])
        self._rung: Any = None  # the doorbell's last reading (tick thread only)
        self._ticks_owed = 0  # ticks still owed to the last ring (tick thread only)
        # The pool's used blocks when `_shrink` last left a target or reclaim unmet (None: met).
        self._unmet_at_used: int | None = None
        # The slots holding live blocks the ranks were last told of (they report them to their daemons).
        self._polled_used_slots = 0
        self._tick_pending = threading.Event()
        self._thread = None
        if input_queue is not None:
            self._thread = threading.Thread(target=self._tick, args=(input_queue,), name="kvmem-tick", daemon=True)
            self._thread.start()
        logger.info(
            "kvmem: vLLM's scheduler maps page slots on %d worker processes (%d blocks per slot)",
            self.num_ranks,
            self.blocks_per_slot,
        )

    def _rpc(self, op: str, *args: Any) -> list[Any]:
        return self._executor.collective_rpc("kvmem_rank", args=(op, *args), timeout=RPC_TIMEOUT_S)

    # ---- what the block pool reads ----

    def num_mapped_slots(self) -> int:
        return self._allocator.get_num_mapped_slots()

    def is_slot_mapped(self, slot: int) -> bool:
        return self._allocator.is_mapped(slot)

    def get_num_used_blocks(self) -> int:
        return self._allocator.get_num_used_blocks()

    def get_num_free_blocks(self) -> int:
        """Free blocks on the slots mapped on every rank."""
        return self._allocator.get_num_free_blocks()

    def slot_usage(self) -> list[tuple[int, int]]:
        return self._allocator.get_slot_usage()

    def used_blocks(self, slot: int) -> list[int]:
        return self._allocator.get_used_blocks(slot)

    def sure_pages(self) -> int:
        """Pages every rank is sure to get now: a local budget's room (none from daemons)."""
        if self._budget_pages < 0 or self._sleeping:
            return 0
        return max(0, self._budget_pages - self.num_mapped_slots() * self.pages_per_growth)

    def sure_slots(self) -> int:
        return self.sure_pages() // self.pages_per_growth

    @property
    def target_pages(self) -> int:
        """The model's target per rank: the smallest of its ranks' (-1: none)."""
        return self._target

    # ---- what the block pool does ----

    def take(self, block_ids: list[int]) -> None:
        self._allocator.take(block_ids)

    def free(self, block_ids: list[int]) -> None:
        self._allocator.free(block_ids)

    def demand_blocks(self, pending: int = 0) -> int:
        """The blocks the pool's measured demand uses in the next second (`ElasticKVCache.demand_blocks`)."""
        return self._demand.blocks(pending)

    def map_slots(self, slots, wait: float | None = None, ahead=()) -> Shortfall | None:
        """Map these slots on every rank, and `ahead` where every rank has their pages ready
        (`ElasticKVCache.map_slots`); why not all of `slots`, if so (module docstring: all ranks or
        none)."""
        todo = sorted({slot for slot in slots if not self._allocator.is_mapped(slot)})
        if not todo:
            return None
        if self._sleeping:
            return ASLEEP
        extra = [slot for slot in dict.fromkeys(ahead) if slot not in todo and not self._allocator.is_mapped(slot)]
        clipped = None
        if self._target >= 0:
            # A rank's target (its limit) is known: ask no rank for slots that rank may not hold.
            # Otherwise the others would map them only to give them back in this same call.
            room = max(0, self._target_slots() - self.num_mapped_slots())
            extra = extra[: max(0, room - len(todo))]
            if room < len(todo):
                todo = todo[:room]
                clipped = Shortfall("limit", f"a rank's target is {self._target} pages ({self._target_slots()} slots)")
                if not todo:
                    return clipped
        level = self._demand.blocks()  # the free blocks slots mapped ahead keep until the raise lapses
        decided = self._demand.decision()
        replies = self._rpc("map", todo, 0.0 if wait is None else wait, extra)
        got = [set(reply["mapped"]) for reply in replies]
        everywhere = set(todo + extra).intersection(*got)
        partial = sorted(set().union(*got) - everywhere)
        if partial:  # a rank may not keep a slot another rank was denied
            self._rpc("unmap", partial)
        for slot in sorted(everywhere):
            self._allocator.add_slot(slot)
        if everywhere:
            self._demand.restart(decided)
        if everywhere & set(extra):  # mapped ahead of demand: not surplus until the raise lapses
            self._raised = (max(level, self._allocator.get_num_free_blocks()), growth.clock())
        if everywhere >= set(todo):
            return clipped
        for reply in replies:
            if reply["shortfall"] is not None:
                return Shortfall(*reply["shortfall"])
        return Shortfall("capacity")

    def _target_slots(self) -> int:
        return self._target // self.pages_per_growth

    def attach_engine(self, lock: Any, evictor=None, on_unmapped=None) -> None:
        """The pool's lock and hooks, as `ElasticKVCache.attach_engine` takes them."""
        self._lock, self._evictor, self._on_unmapped = lock, evictor, on_unmapped

    def attach_pool(self, pool: Any) -> None:
        """The pool whose drain (`begin_drain`, `blocks_in_use`, `finish_drain`) and `resume` sleep uses."""
        self._pool = pool

    # ---- the daemons' wishes (engine thread, every TICK_S) ----

    def maintain(self) -> None:
        """Ask every rank what its daemon wants and do it: follow targets and reclaims, sleep, wake."""
        if self._closed:
            return
        used_slots = self._allocator.counts()[3]
        polls = self._rpc("poll", used_slots)
        self._polled_used_slots = used_slots
        self._doorbell.watch([p.get("status") for p in polls])  # a rank may have reconnected
        with self._lock:
            targets = [p["target_pages"] for p in polls if p["target_pages"] >= 0]
            self._target = min(targets) if targets else -1
            self._reclaim = max(p["reclaim_pages"] for p in polls)
            for poll in polls:
                for kind, value in poll["events"]:
                    if kind == "sleep":
                        self._sleep_asked(poll["rank"], value)
                    else:
                        self._woke(poll["rank"], value)
            if self._sleeping:
                self._drain()
            else:
                self._shrink()

    def _shrink(self) -> None:
        """Give back what targets and reclaims ask for, and empty slots beyond a slot of free blocks."""
        per = self.pages_per_growth
        want = -(-self._reclaim // per)
        if self._target >= 0:
            want = max(want, -(-(self.num_mapped_slots() * per - self._target) // per))
        empty = self._allocator.get_empty_slots()
        if want > len(empty) and self._evictor is not None:
            self._evictor(want - len(empty))  # the pool drops cached blocks so that slots empty
            empty = self._allocator.get_empty_slots()
        # Like ElasticKVCache's high watermark of one slot: an idle model keeps at most one empty slot
        # (more for `growth.DECAY_S` after slots were mapped ahead of demand).
        surplus = self._allocator.get_num_free_blocks() - self._headroom()
        chosen = empty[: max(want, surplus // self.blocks_per_slot)]
        if chosen:
            self._unmap(chosen)
        # Unmet (blocks in use hold the slots): look again once the pool's blocks have moved.
        self._unmet_at_used = self._allocator.get_num_used_blocks() if want > len(chosen) else None

    def _headroom(self) -> int:
        """Free blocks kept mapped: one slot's, or what slots mapped ahead of demand left free, until
        `growth.DECAY_S` after that growth."""
        raised, since = self._raised
        return max(self.blocks_per_slot, raised) if growth.clock() - since <= growth.DECAY_S else self.blocks_per_slot

    def _unmap(self, slots: list[int]) -> None:
        for slot in slots:
            self._allocator.remove_slot(slot)  # from here the pool cannot hand out their blocks
        self._rpc("unmap", slots)
        if self._on_unmapped is not None:
            self._on_unmapped(slots)

    def _sleep_asked(self, rank: int, offload: bool) -> None:
        if not self._sleeping:
            self._offload, self._restored, self._drain_done = offload, True, False
            self._pool.begin_drain()
            how = "offload" if offload else "discard"
            logger.info("kvmem: rank %d's daemon asks for a sleep (%s); draining", rank, how)
        self._sleeping.add(rank)
        if not self._drain_done:
            self._offload = self._offload and offload  # one rank discarding discards the model's cache
            return
        # A later rank's sleep: the engine is drained already. Discarding after an offload drops
        # the cache now (what other ranks saved is dropped at the wake, `_woke`).
        if self._offload and not offload:
            self._offload = False
            self._pool.finish_drain(False)
            self._unmap(self._allocator.get_empty_slots())
        self._rpc("drained")

    def _drain(self) -> None:
        """Finish the drain once no block is referenced: unmap what need not be kept, release the ranks."""
        if self._drain_done or self._pool.blocks_in_use() > 0:
            return
        self._pool.finish_drain(self._offload)  # discarding: the prefix cache and the null block go
        empty = self._allocator.get_empty_slots()
        if empty:
            self._unmap(empty)
        self._rpc("drained")
        self._drain_done = True

    def _woke(self, rank: int, restored: bool) -> None:
        self._sleeping.discard(rank)
        self._restored = self._restored and restored
        if self._sleeping:
            return  # awake when every rank that slept is
        # Reconcile: every slot the pool counts must be back on every rank; a slot a rank restored
        # that the pool does not count (its cache was dropped meanwhile) goes back.
        on_ranks = [set(info["mapped"]) for info in self._rpc("describe")]
        counted = {slot for slot in range(self.max_slots) if self._allocator.is_mapped(slot)}
        if not all(counted <= mapped for mapped in on_ranks):
            self._restored = False
        if not self._restored:  # a rank lost its saved cache: no rank keeps any slot, nothing is cached
            counted = set()
            self._allocator = BlockAllocator(self.blocks_per_slot, self.max_slots)
            self._demand = growth.DemandMeter(self._allocator, self.blocks_per_slot, self.blocks_per_slot)
        stray = sorted(set().union(*on_ranks) - counted)
        if stray:
            self._rpc("unmap", stray)
        logger.info("kvmem: the model is awake (%s)", "cache restored" if self._restored else "cache lost")
        self._pool.resume(self._restored)

    # ---- the tick ----

    def _tick(self, input_queue: Any) -> None:
        from vllm.v1.engine import EngineCoreRequestType

        while not self._closed:
            time.sleep(TICK_S)
            # One tick queued at a time, however busy the loop; the doorbell is read only when a
            # tick could be queued, so that a ring is never read and then dropped.
            if not self._tick_pending.is_set() and self._wants_maintain():
                self._tick_pending.set()
                input_queue.put_nowait((EngineCoreRequestType.WAKEUP, TICK))

    def _wants_maintain(self) -> bool:
        """Whether `maintain` has work (tick thread; see the module docstring). Reads of the pool's
        counts race with the engine thread harmlessly: a stale one costs one tick, or waits one."""
        allocator = self._allocator
        if self._sleeping:
            if not self._drain_done:
                return True  # draining: `_drain` finishes once no block is referenced
        elif self._unmet_at_used is not None and allocator.get_num_used_blocks() != self._unmet_at_used:
            return True
        elif allocator.get_empty_slots() and allocator.get_num_free_blocks() >= self._headroom() + self.blocks_per_slot:
            return True  # a slot or more of free blocks beyond the watermark (`_shrink`)
        elif allocator.counts()[3] != self._polled_used_slots:
            return True  # the slots in use changed: the ranks tell their daemons (USED, idle pages)
        reading = self._doorbell.read()
        if reading != self._rung:
            self._rung = reading
            self._ticks_owed = DOORBELL_TICKS
        if self._ticks_owed:
            self._ticks_owed -= 1
            return True
        return False

    def on_tick(self) -> None:
        """The engine loop took a tick off its input queue: run `maintain`."""
        self._tick_pending.clear()
        self.maintain()

    def close(self) -> None:
        """Stop the tick (the ranks' caches close with their processes). Idempotent."""
        self._closed = True


def handling_ticks(stock):
    """Wrap `EngineCoreProc._handle_client_request`: a WAKEUP carrying `TICK` runs `maintain`."""

    def _handle_client_request(self, request_type, request):
        if isinstance(request, str) and request == TICK:
            # Not once the engine shuts down: its executor may be gone.
            if _current is not None and getattr(self, "is_running", lambda: True)():
                _current.on_tick()
            return None
        return stock(self, request_type, request)

    _handle_client_request.__kvmem_stock__ = stock
    return _handle_client_request


def binding_engine_core(stock):
    """Wrap `EngineCore._initialize_kv_caches`: remember the engine core before its workers' caches
    are sized (the scheduler's pool, built right after, reaches them through its executor)."""

    def _initialize_kv_caches(self, *args, **kwargs):
        bind_engine_core(self)
        return stock(self, *args, **kwargs)

    _initialize_kv_caches.__kvmem_stock__ = stock
    return _initialize_kv_caches
