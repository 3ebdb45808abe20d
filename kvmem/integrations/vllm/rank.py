"""A rank's worker under vLLM's multiprocess executor: its kvmem cache maps what the scheduler decides.

Design note
-----------
With vLLM's multiprocess executor (every TP>1 engine, and vLLM's CPU platform even at TP=1) each
rank's worker is a process of its own and the scheduler's block pool lives in the engine-core
process (`kvmem.integrations.vllm.ranked_cache` is the scheduler's side). Each worker keeps what
it has with the in-process executor: its own session with the daemon of its own GPU (pages come
from that daemon to this process as descriptors, and nowhere else), and an `ElasticKVCache`
whose reservation holds vLLM's KV tensors (`allocation`). What changes is who decides: here the
cache *follows*. It maps and unmaps page slots only when the scheduler says so, through vLLM's
own executor channel (`MultiprocExecutor.collective_rpc`, the message queue that also carries
each step's scheduler output, so a command is run in order with the steps around it: an unmap
runs after every step scheduled before it has finished). The worker never unmaps on its own:
every block of a mapped slot is marked in use in its cache, so the cache's background thread
never finds an empty slot to give back (the daemon's targets and reclaims are answered by the
scheduler instead, which alone knows which blocks are free).

What the scheduler cannot see, the rank reports when asked (`poll`): the daemon's target and
reclaims for this rank, and its sleep and wake requests. What the rank cannot see, the poll
carries: how many slots hold live blocks, which the rank reports to its daemon as its usage.

A sleep request blocks the cache's own sleep (its sleep hook) until the scheduler has drained the
engine and says `drained`; then the cache offloads or gives back its slots as it does in one
process, and tells the daemon it slept.

`kvmem_rank` is the one method added to vLLM's worker classes (`register`); the executor calls
it by name with plain values (slot numbers, flags), never with pages.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Iterable
from typing import Any

from kvmem.cache import ElasticKVCache
from kvmem.integrations.vllm import allocation
from kvmem.integrations.vllm.doorbell import status_entry

logger = logging.getLogger(__name__)

SLEEP_LOG_S = 10.0  # a sleep that waits for the scheduler's drain says so this often

_follower: RankFollower | None = None


class RankFollower:
    """The worker side of one rank: its cache, mapped as the scheduler says (module docstring).

    Args:
        cache: The rank's kvmem cache behind vLLM's KV tensors (`allocation.current_cache()`).
        rank: vLLM's rank of this worker (for messages).
    """

    def __init__(self, cache: ElasticKVCache, rank: int):
        self.cache = cache
        self.rank = rank
        self._lock = threading.Lock()
        self._events: list[list[Any]] = []  # ["sleep", offload] / ["woke", restored], oldest first
        self._drained = threading.Event()
        self._sleep_waiting = False
        self._closing = False
        # Held around a map and the holding of its blocks: the cache's background thread unmaps only
        # under it (`attach_engine`), so it never sees a slot just mapped and not yet held as empty.
        self._engine_lock = threading.RLock()
        cache.attach_engine(self._engine_lock)
        with self._engine_lock:
            self._hold(range(cache.max_slots))
        cache.add_sleep_hook(self._on_sleep)
        cache.wake_hooks.append(self._on_wake)

    # ---- the scheduler's commands (vLLM's worker thread) ----

    def describe(self) -> dict[str, Any]:
        """The cache's geometry and what is mapped, for the scheduler to check ranks agree."""
        cache = self.cache
        sure = cache.sure_pages()
        return {
            "rank": self.rank,
            "blocks_per_slot": cache.blocks_per_slot,
            "max_slots": cache.max_slots,
            "pages_per_slot": cache.pages_per_growth,
            "page_size": cache.page_size,
            "mapped": self.mapped(),
            # A local budget (no daemon) is sure room; a daemon promises nothing ahead (-1).
            "budget_pages": sure + cache.num_mapped_slots() * cache.pages_per_growth if sure > 0 else -1,
            "status": status_entry(allocation.status_segment()),
        }

    def mapped(self) -> list[int]:
        return [slot for slot in range(self.cache.max_slots) if self.cache.is_slot_mapped(slot)]

    def map(self, slots: list[int], wait: float, ahead: list[int] | None = None) -> dict[str, Any]:
        """Map these slots (as many as the daemon grants, lowest first), and `ahead` if their pages are
        ready (`ElasticKVCache.map_slots`); which of them all are mapped now."""
        ahead = ahead or []
        with self._engine_lock:
            shortfall = self.cache.map_slots(slots, wait=wait, ahead=ahead)
            self._hold(slots + ahead)
        return {
            "mapped": [slot for slot in slots + ahead if self.cache.is_slot_mapped(slot)],
            "shortfall": None if shortfall is None else [shortfall.reason, shortfall.detail],
        }

    def unmap(self, slots: list[int]) -> int:
        """Unmap these slots and give their pages back (the scheduler holds no block on them)."""
        cache = self.cache
        with self._engine_lock:
            blocks = [block for slot in slots if cache.is_slot_mapped(slot) for block in cache.used_blocks(slot)]
            if blocks:
                cache.free(blocks)
            # Only slots the scheduler released are ever empty here (`_hold`), so this takes exactly them.
            return cache.shrink()

    def poll(self, used_slots: int | None = None) -> dict[str, Any]:
        """The daemon's wishes for this rank since the last poll (the sleep and wake events once each).

        Args:
            used_slots: Slots holding live blocks, as the scheduler counts them: what the daemon is
                told this rank uses (its cache holds every block of a mapped slot, `_hold`).
        """
        if used_slots is not None:
            self.cache.report_engine_usage(used_slots)
        with self._lock:
            events, self._events = self._events, []
        cache = self.cache
        return {
            "rank": self.rank,
            "target_pages": -1 if cache.asleep else cache.target_pages,
            "reclaim_pages": cache.reclaim_pages,
            "events": events,
            "status": status_entry(allocation.status_segment()),
        }

    def drained(self) -> None:
        """The scheduler drained the engine: a sleep waiting in `_on_sleep` may go on (a rank with
        none waiting ignores it: the scheduler tells every rank, and a later sleep needs its own drain)."""
        with self._lock:
            if self._sleep_waiting:
                self._drained.set()

    # ---- the cache's hooks (its background thread) ----

    def release(self) -> None:
        """The worker exits: a sleep waiting for the scheduler goes on, so that the cache can close
        (`ElasticKVCache.close` joins the thread that runs the sleep)."""
        with self._lock:
            self._closing = True
            self._drained.set()

    def _on_sleep(self, offload: bool) -> None:
        with self._lock:
            if self._closing:
                return
            self._sleep_waiting = True
            self._events.append(["sleep", offload])
        waited = 0.0
        while not self._drained.wait(timeout=SLEEP_LOG_S):
            waited += SLEEP_LOG_S
            logger.warning("kvmem rank %d: the sleep waits for the scheduler's drain (%.0f s)", self.rank, waited)
        with self._lock:
            self._sleep_waiting = False
            self._drained.clear()
        # Discarding, the scheduler has unmapped every slot already; offloading, it has unmapped the
        # empty ones, and the cache now offloads the rest.

    def _on_wake(self, restored: bool) -> None:
        with self._lock:
            self._events.append(["woke", restored])

    def _hold(self, slots: Iterable[int]) -> None:
        """Mark every block of these mapped slots in use in the rank's cache (module docstring)."""
        cache = self.cache
        bps = cache.blocks_per_slot
        blocks = []
        for slot in slots:
            if cache.is_slot_mapped(slot) and not cache.used_blocks(slot):
                blocks.extend(range(slot * bps, (slot + 1) * bps))
        if blocks and not cache.asleep:
            cache.take(blocks)


def follower(rank: int) -> RankFollower:
    """This worker process's follower, made on first use over its kvmem cache."""
    global _follower
    cache = allocation.current_cache()
    if cache is None:
        raise RuntimeError("kvmem: the scheduler asked a worker with no kvmem KV cache to follow it")
    if _follower is None or _follower.cache is not cache:
        _follower = RankFollower(cache, rank)
    return _follower


def _release() -> None:
    if _follower is not None:
        _follower.release()


# Registered after `allocation`'s `close` (this module is imported later), so it runs first.
atexit.register(_release)


def kvmem_rank(self, op: str, *args: Any) -> Any:
    """The method `register` adds to vLLM's worker classes: run the scheduler's command `op`.

    Args:
        self: vLLM's worker (its ``rank``).
        op: "alignment", "describe", "map" (slots, wait), "unmap" (slots), "poll" or "drained".

    Raises:
        ValueError: An unknown `op`.
    """
    if op == "alignment":  # asked while vLLM sizes the cache, before there is one to follow
        from kvmem.integrations.vllm import budget

        return budget.alignment()
    if op not in ("describe", "map", "unmap", "poll", "drained"):
        raise ValueError(f"kvmem: unknown rank command {op!r}")
    return getattr(follower(getattr(self, "rank", 0)), op)(*args)
