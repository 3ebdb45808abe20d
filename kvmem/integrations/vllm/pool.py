"""kvmem's block pool for vLLM: vLLM's own `BlockPool`, its blocks backed by kvmem pages as they are used.

Design note
-----------
vLLM's scheduler keeps one `BlockPool` (`vllm/v1/core/block_pool.py`, built in
`vllm/v1/core/kv_cache_coordinator.py` `KVCacheCoordinator.__init__`) over `num_blocks` blocks.
Its free queue (`FreeKVCacheBlockQueue`) orders every block with ``ref_cnt == 0``: freed blocks
without a hash are prepended (reused first), never-used blocks follow in id order, freed blocks
with a hash (vLLM's prefix cache) are appended and evicted least recently used first.
`KvmemBlockPool` keeps all of that, so vLLM's own tests pass against it unchanged
(tests/vllm_upstream), and adds where the blocks' memory comes from. vLLM block ``b`` is kvmem
block ``b`` (`kvmem.integrations.vllm.geometry`); a kvmem page slot backs `blocks_per_slot`
consecutive blocks in every layer.

Which blocks hold pages. kvmem counts a block as in use ("held") while vLLM may read it: it is
referenced (``ref_cnt > 0``), or cached (it has a hash: the prefix cache may hit it), or pinned
for a reader (`unpin_blocks` watchers), or it is the null block. Every other block is free for
kvmem too, and a slot whose blocks are all free goes back to the daemon once the free blocks
exceed the cache's high watermark. So without prefix caching the pages fall back as requests
finish; with it, freed full blocks stay cached and keep their pages until the daemon wants them
(another model's demand, a lowered limit): then `evictor` drops the cached, unreferenced blocks
of the slots with the fewest held blocks and those slots go back.

Free blocks and allocation. The blocks of unmapped slots stay in the free queue where vLLM put
them. `get_num_free_blocks` -- what the scheduler checks before it allocates, and preempts or
queues on when short (`vllm/v1/core/kv_cache_manager.py` `KVCacheManager.allocate_slots`) --
counts only what can be had for sure: free blocks on mapped slots, plus the slots a local page
source still has room for (`PageSource.sure_pages`; none from a daemon). `get_new_blocks(n)`
first maps the slots of the first `n` queued blocks, then lets vLLM pop them; a block whose slot
the daemon denies goes to the end of the queue and the next one is tried, so it never hands out
an unbacked block and never fails within its count. Before the count is asked, the demand hint
(`prepare`, from `KVCacheCoordinator.get_num_blocks_to_allocate`) maps what the request will
take, so a request grows the cache instead of waiting for it. The scheduler admits a step's
requests one after another, so a hint that must grow also names the slots of the blocks queued
next, as many as the measured demand fills (`_ahead`, `ElasticKVCache.demand_blocks`): they are
mapped in the same growth if the daemon has their pages free, never waited for, so that a burst
grows the cache once rather than once per request (each growth costs the ranks' driver calls
and the daemon's round trip, whatever its size). When the daemon denies memory the
count stays short and vLLM does what it does when its own pool is full: queue new requests,
preempt running ones. After a deny, the pool asks the daemon again only after `DENY_BACKOFF_S`
(a daemon that must reclaim would otherwise stall every scheduler step). Slots given back by
kvmem also move their blocks to the end of the queue (`on_unmapped`), so a later request uses
memory the pool holds before it asks for more. A lowered limit (the daemon's target) caps the
count so that the blocks in use fit it, and while the model holds more slots than its target, new
blocks come only from the slots it keeps (`_kept_slots`: as many as the target allows, those with
the most blocks held, chosen when it goes over and again whenever one of them goes back): the
others drain as their requests finish and go back, so the cache settles under the limit even
while requests keep coming.

Threads. vLLM calls the pool from its scheduler thread; kvmem's background thread evicts and
unmaps. `engine_lock` (reentrant) guards the pool: every pool method takes it, kvmem takes it
around every unmapping, and `Scheduler.schedule` holds it for a whole step (installed by
`install_scheduler_patches`), because a step finds cached blocks (`get_computed_blocks`) and only
later touches them (`allocate_slots`); an eviction in between would hand a request blocks whose
pages are gone.

Sleep. The drain hook (kvmem's `on_sleep`) makes the count 0, so nothing new is admitted and a
running request is preempted when it needs a block, and waits until no block is referenced. A
discarding sleep then drops the prefix cache and the null block, so every slot empties; an
offloading sleep keeps them (kvmem saves the slots that hold blocks to the daemon's host tier
and maps them back on wake at the same offsets: the prefix cache survives). The wake hook
admits again; if the saved cache was lost it drops the prefix cache.

The null block (block 0) is held while the model is awake: vLLM's block tables are padded with
it and warm-up runs read it, so its slot stays mapped (one slot is an awake engine's floor).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import KVCacheBlock

from kvmem.cache import ElasticKVCache
from kvmem.integrations.vllm.ranked_cache import RankedCache

logger = logging.getLogger(__name__)

# The scheduler waits at most this long for the daemon's pages when a request needs a slot: long
# enough for the daemon to create a slot's pages, short enough not to stall a step for long.
GROW_WAIT_S = 0.05
# After a deny the scheduler asks the daemon again only after this long.
DENY_BACKOFF_S = 0.25
DRAIN_LOG_S = 10.0  # a drain that waits says what for this often

Backing = Callable[[int], ElasticKVCache | RankedCache]
_backing: Backing | None = None


def set_backing(provider: Backing | None) -> None:
    """Set where pools get their kvmem cache: ``provider(num_blocks)`` returns a cache whose
    block ``b`` backs vLLM block ``b`` (the worker's, `allocation.cache_for_pool`; a test's own)."""
    global _backing
    _backing = provider


class KvmemBlockPool(BlockPool):
    """vLLM's `BlockPool` over a kvmem `ElasticKVCache` (see the module docstring).

    Same arguments as `BlockPool`; the kvmem cache comes from the provider given to `set_backing`.
    """

    def __init__(self, num_gpu_blocks: int, enable_caching: bool, hash_block_size: int, **kwargs):
        if _backing is None:
            raise RuntimeError("kvmem: no KV cache backs vLLM's block pool (set_backing was not called)")
        cache = _backing(num_gpu_blocks)
        if cache.max_blocks < num_gpu_blocks:
            raise ValueError(f"kvmem: a cache of {cache.max_blocks} blocks cannot back {num_gpu_blocks}")
        self.kv_cache = cache
        self.engine_lock = threading.RLock()
        self._drained = threading.Condition(self.engine_lock)
        self._held = bytearray(num_gpu_blocks)  # 1: kvmem counts the block in use (module docstring)
        self._bps = cache.blocks_per_slot
        self._last_slot, rest = divmod(num_gpu_blocks, self._bps)
        self._last_slot_blocks = rest or self._bps  # blocks of vLLM's on the last slot
        if not rest:
            self._last_slot -= 1
        self._asleep = False  # from the drain until the wake: nothing may be allocated
        self._null_held = False
        self._deny_until = 0.0
        self._kept: set[int] | None = None  # while over target: the slots new blocks may come from
        self._stock_counts = False  # get_num_free_blocks answers vLLM's own count (inside stock methods)
        super().__init__(num_gpu_blocks, enable_caching, hash_block_size, **kwargs)
        with self.engine_lock:
            if not self._hold_null():
                logger.warning("kvmem: no page for vLLM's null block yet; the engine waits for memory")
        cache.attach_engine(self.engine_lock, evictor=self._evict, on_unmapped=self._unmapped)
        if isinstance(cache, RankedCache):  # the scheduler drives the drain itself (ranked_cache)
            cache.attach_pool(self)
        else:
            cache.add_sleep_hook(self._drain)
            cache.wake_hooks.append(self.resume)

    # ---- counts ----

    def _slot_blocks(self, slot: int) -> range:
        """vLLM's blocks on `slot`."""
        start = slot * self._bps
        return range(start, start + (self._last_slot_blocks if slot == self._last_slot else self._bps))

    def _mapped_blocks(self) -> int:
        cache = self.kv_cache
        mapped = cache.num_mapped_slots() * self._bps
        if cache.is_slot_mapped(self._last_slot):
            mapped -= self._bps - self._last_slot_blocks
        return mapped

    def _sure_blocks(self) -> int:
        """Free blocks on unmapped slots the page source is sure to back (a local budget's room)."""
        cache = self.kv_cache
        room = cache.sure_slots()
        if room <= 0:
            return 0
        unmapped = self._last_slot + 1 - cache.num_mapped_slots()
        last_unmapped = not cache.is_slot_mapped(self._last_slot)
        full = unmapped - last_unmapped
        sure = min(room, full) * self._bps
        if last_unmapped and room > full:
            sure += self._last_slot_blocks
        return sure

    def _in_use(self) -> int:
        """Blocks referenced by requests (every block out of the free queue but the null block)."""
        return self.num_gpu_blocks - 1 - self.free_block_queue.num_free_blocks

    def get_num_free_blocks(self) -> int:
        """The blocks the scheduler may allocate now, each backed for sure (see the module docstring)."""
        with self.engine_lock:
            queued = self.free_block_queue.num_free_blocks
            if self._stock_counts:
                return queued
            if self._asleep or not self._hold_null():
                return 0
            unmapped = self.num_gpu_blocks - self._mapped_blocks()  # all of them queued
            free = min(queued, queued - unmapped + self._sure_blocks())
            target = self.kv_cache.target_pages
            if target >= 0:  # a lowered limit: the blocks in use must fit it
                allowed = min(self.num_gpu_blocks, target // self.kv_cache.pages_per_growth * self._bps)
                free = min(free, max(0, allowed - (self.num_gpu_blocks - queued)))
            kept = self._kept_slots()
            if kept is not None:  # over target: only the queued blocks of the kept slots
                # Python work per kept block, only while over target (until the others have drained).
                blocks = self.blocks
                on_kept = sum(1 for slot in kept for b in self._slot_blocks(slot) if blocks[b].ref_cnt == 0)
                null = self.null_block
                free = min(free, on_kept - (null.block_id // self._bps in kept and null.ref_cnt == 0))
            return free

    def _kept_slots(self) -> set[int] | None:
        """While the model holds more slots than its target: the slots new blocks may come from
        (module docstring); None otherwise. Engine lock held.

        Kept: the null block's slot, then the mapped slots with the most blocks held (ties: the
        lowest), as many as the target allows. The choice stands while every kept slot stays mapped,
        so that the slots left out drain instead of the choice moving with every allocation.
        """
        cache = self.kv_cache
        target = cache.target_pages
        keep = target // cache.pages_per_growth if target >= 0 else -1
        if keep < 0 or cache.num_mapped_slots() <= keep:
            self._kept = None
            return None
        kept = self._kept
        if kept is None or len(kept) != keep or not all(cache.is_slot_mapped(slot) for slot in kept):
            chosen = [self.null_block.block_id // self._bps] if keep and self._null_held else []
            chosen += [slot for slot, _ in cache.slot_usage() if slot not in chosen][: keep - len(chosen)]
            kept = self._kept = set(chosen)
        return kept

    def get_usage(self) -> float:
        with self.engine_lock:
            self._stock_counts = True
            try:
                return super().get_usage()
            finally:
                self._stock_counts = False

    # ---- growth ----

    def _may_grow(self) -> bool:
        return self.kv_cache.sure_pages() > 0 or time.monotonic() >= self._deny_until

    def _grow(self, slots: list[int], ahead: list[int] | None = None) -> None:
        shortfall = self.kv_cache.map_slots(slots, wait=GROW_WAIT_S, ahead=ahead or ())
        if shortfall is not None and shortfall.reason != "asleep":
            self._deny_until = time.monotonic() + DENY_BACKOFF_S
            logger.debug("kvmem: %d slots asked for, short (%s)", len(slots), shortfall)

    def _hold_null(self) -> bool:
        """Hold the null block (map slot 0 if need be); whether it is held."""
        if self._null_held:
            return True
        cache = self.kv_cache
        if not cache.is_slot_mapped(0) and self._may_grow():
            self._grow([0])
        if not cache.is_slot_mapped(0):
            return False
        cache.take([self.null_block.block_id])
        self._held[self.null_block.block_id] = 1
        self._null_held = True
        return True

    def prepare(self, num_blocks: int) -> None:
        """The scheduler is about to ask for `num_blocks` blocks: map the slots of the first
        `num_blocks` queued blocks now, so that they count (called from the demand hint)."""
        with self.engine_lock:
            if num_blocks <= 0 or self._asleep or self._kept_slots() is not None or not self._may_grow():
                return
            is_mapped = self.kv_cache.is_slot_mapped
            if self._mapped_blocks() == self.num_gpu_blocks:
                return
            queued = self.free_block_queue.iter_blocks_after(None)
            head = itertools.islice(queued, num_blocks)
            slots = sorted({b.block_id // self._bps for b in head if not is_mapped(b.block_id // self._bps)})
            if slots:
                self._grow(slots, self._ahead(queued, num_blocks, len(slots)))

    def _ahead(self, queued: Iterator[KVCacheBlock], num_blocks: int, growing: int) -> list[int]:
        """The unmapped slots of the blocks queued next after a request's `num_blocks` (`queued` is
        past them), as many whole slots as the measured demand fills beyond the `growing` slots the
        request needs (`ElasticKVCache.demand_blocks`, the request counted): mapped with them if
        their pages are ready, so that a step's requests grow the cache once, not once each."""
        cache = self.kv_cache
        free = cache.get_num_free_blocks()  # on mapped slots, as kvmem counts them
        wanted = (cache.demand_blocks(num_blocks) - free + num_blocks) // self._bps - growing
        ahead: dict[int, None] = {}
        if wanted <= 0:
            return []
        # The blocks the demand would take next, in the order vLLM hands them out.
        for block in itertools.islice(queued, wanted * self._bps):
            slot = block.block_id // self._bps
            if not cache.is_slot_mapped(slot):
                ahead[slot] = None
                if len(ahead) == wanted:
                    break
        return list(ahead)

    def _front_mapped(self, num_blocks: int) -> None:
        """Arrange the free queue so that its first `num_blocks` blocks are on mapped slots (on the
        kept slots, over target): map their slots, and send blocks whose slots were denied (or are not
        kept) to the end of the queue."""
        queue = self.free_block_queue
        kept = self._kept_slots()
        # Over target, only the kept slots' blocks are handed out, and nothing is mapped.
        usable = self.kv_cache.is_slot_mapped if kept is None else kept.__contains__
        picked: list[KVCacheBlock] = []
        deferred: list[KVCacheBlock] = []
        while len(picked) < num_blocks:
            batch = queue.popleft_n(min(num_blocks - len(picked), queue.num_free_blocks))
            if not batch:  # the count promised more than the queue holds on mapped slots
                queue.prepend_n(picked)
                queue.append_n(deferred)
                raise RuntimeError(f"kvmem: {num_blocks} blocks were counted free but {len(picked)} are backed")
            missing = sorted({b.block_id // self._bps for b in batch if not usable(b.block_id // self._bps)})
            if missing and kept is None and self._may_grow():
                self._grow(missing)
            for block in batch:
                (picked if usable(block.block_id // self._bps) else deferred).append(block)
        queue.prepend_n(picked)  # in the order vLLM queued them
        queue.append_n(deferred)

    # ---- kvmem's view of each block ----

    def _own(self, block: KVCacheBlock) -> bool:
        block_id = block.block_id
        return 0 <= block_id < self.num_gpu_blocks and self.blocks[block_id] is block

    def _idle(self, block: KVCacheBlock) -> bool:
        """No reader may use the block: kvmem may count it free."""
        return (
            block.ref_cnt == 0
            and block.block_hash is None
            and not block.is_null
            and block.block_id not in self._reuse_watchers
        )

    def _sync(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Bring kvmem's counts in line with these blocks' state (free the idle, take the others)."""
        release, hold = [], []
        seen: set[int] = set()  # a block may come twice (two requests shared it)
        for block in blocks:
            if not self._own(block) or block.is_null or block.block_id in seen:
                continue
            seen.add(block.block_id)
            held = self._held[block.block_id]
            if held and self._idle(block):
                release.append(block.block_id)
            elif not held and not self._idle(block):
                hold.append(block.block_id)
        if release:
            self.kv_cache.free(release)
            for block_id in release:
                self._held[block_id] = 0
        if hold:
            # A block can become referenced without `get_new_blocks` only from the queue, where
            # blocks on unmapped slots are always idle: its slot is mapped. Checked all the same.
            self.kv_cache.take(hold)
            for block_id in hold:
                self._held[block_id] = 1

    # ---- vLLM's BlockPool, backed ----

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        with self.engine_lock:
            if num_blocks > self.get_num_free_blocks():
                return super().get_new_blocks(num_blocks)  # vLLM's own refusal (a ValueError)
            self._front_mapped(num_blocks)
            self._stock_counts = True
            try:
                blocks = super().get_new_blocks(num_blocks)
            finally:
                self._stock_counts = False
            self._sync(blocks)
            return blocks

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        with self.engine_lock:
            blocks = list(ordered_blocks)
            super().free_blocks(blocks)
            self._sync(blocks)
            if self._asleep and self._in_use() == 0:
                self._drained.notify_all()

    def touch(self, blocks: Sequence[KVCacheBlock]) -> None:
        with self.engine_lock:
            if self._asleep:
                raise RuntimeError("kvmem: vLLM touched cached blocks while the model sleeps (its pages are gone)")
            super().touch(blocks)
            self._sync(blocks)

    def unpin_blocks(self, blocks: Iterable[KVCacheBlock], on_reuse: Callable[[KVCacheBlock], None]) -> None:
        with self.engine_lock:
            super().unpin_blocks(blocks, on_reuse)  # still read: they stay held until reused
            if self._asleep and self._in_use() == 0:
                self._drained.notify_all()

    def cache_full_blocks(self, request, blocks, *args, **kwargs) -> None:
        with self.engine_lock:
            super().cache_full_blocks(request, blocks, *args, **kwargs)

    def cache_partial_block(self, request, block, *args, **kwargs):
        with self.engine_lock:
            result = super().cache_partial_block(request, block, *args, **kwargs)
            self._sync([block])
            return result

    def move_block_hashes(self, src_block: KVCacheBlock, dst_block: KVCacheBlock) -> None:
        with self.engine_lock:
            super().move_block_hashes(src_block, dst_block)
            self._sync([src_block, dst_block])

    def get_cached_block(self, block_hash, kv_cache_group_ids: list[int]):
        with self.engine_lock:
            return super().get_cached_block(block_hash, kv_cache_group_ids)

    def emit_cached_block_events(self, *args, **kwargs) -> None:
        with self.engine_lock:
            super().emit_cached_block_events(*args, **kwargs)

    def evict_blocks(self, block_ids: set[int]) -> None:
        with self.engine_lock:
            super().evict_blocks(block_ids)
            self._sync(self.blocks[block_id] for block_id in block_ids)

    def reset_prefix_cache(self) -> bool:
        with self.engine_lock:
            self._stock_counts = True
            try:
                reset = super().reset_prefix_cache()
            finally:
                self._stock_counts = False
            if reset:
                self._sync(self.blocks[block_id] for block_id, held in enumerate(self._held) if held)
            return reset

    def take_events(self):
        with self.engine_lock:
            return super().take_events()

    def check_backing(self) -> None:
        """Check that kvmem's view agrees with vLLM's (for tests; O(blocks)).

        Raises:
            AssertionError: Naming the first block whose state disagrees.
        """
        with self.engine_lock:
            cache = self.kv_cache
            queued = {block.block_id for block in self.free_block_queue.get_all_free_blocks()}
            for block in self.blocks:
                block_id = block.block_id
                slot_mapped = cache.is_slot_mapped(block_id // self._bps)
                should_hold = self._null_held if block.is_null else not self._idle(block)
                if bool(self._held[block_id]) != should_hold:
                    raise AssertionError(f"kvmem: block {block_id} held={self._held[block_id]} but {block!r}")
                if should_hold and not slot_mapped:
                    raise AssertionError(f"kvmem: block {block_id} is in use on an unmapped slot")
                if not block.is_null and (block_id in queued) != (block.ref_cnt == 0):
                    raise AssertionError(f"kvmem: block {block_id} queued={block_id in queued} with {block!r}")
            used = cache.get_num_used_blocks()
            if used != sum(self._held):
                raise AssertionError(f"kvmem: the cache has {used} blocks in use, the pool holds {sum(self._held)}")

    # ---- kvmem's hooks (its background thread) ----

    def _evict(self, slots: int) -> None:
        """kvmem's evictor: the daemon wants `slots` more slots back than are empty. Drop the cached,
        unreferenced blocks of the slots holding the fewest blocks, until that many are empty."""
        with self.engine_lock:
            if self._asleep:
                return
            cache = self.kv_cache
            emptied = 0
            for slot, used in reversed(cache.slot_usage()):  # the emptiest first
                if emptied >= slots:
                    break
                if not used:
                    continue
                blocks = [self.blocks[i] for i in cache.used_blocks(slot) if i < self.num_gpu_blocks]
                if any(b.ref_cnt or b.is_null or b.block_id in self._reuse_watchers for b in blocks):
                    continue
                for block in blocks:
                    self._maybe_evict_cached_block(block)  # vLLM's eviction: hashes, events, metrics
                self._sync(blocks)
                emptied += 1
            if emptied:
                logger.info("kvmem: evicted cached blocks of %d slots for the daemon", emptied)

    def _unmapped(self, slots: list[int]) -> None:
        """kvmem gave `slots` back: their blocks go to the end of the free queue (reused last)."""
        with self.engine_lock:
            queue = self.free_block_queue
            moved = []
            for slot in slots:
                if self.kv_cache.is_slot_mapped(slot):
                    continue
                for block_id in self._slot_blocks(slot):
                    block = self.blocks[block_id]
                    if block.prev_free_block is not None:  # queued (the null block never is)
                        queue.remove(block)
                        moved.append(block)
            queue.append_n(moved)

    def _drain(self, offload: bool) -> None:
        """kvmem's sleep hook (a cache in this process, on its background thread): admit nothing,
        wait until no block is referenced, then `finish_drain`."""
        with self.engine_lock:
            self.begin_drain()
            started = time.monotonic()
            while self.blocks_in_use() > 0:
                if not self._drained.wait(timeout=DRAIN_LOG_S):
                    logger.warning(
                        "kvmem: sleep waits for %d referenced blocks (%.0f s)",
                        self.blocks_in_use(),
                        time.monotonic() - started,
                    )
            self.finish_drain(offload)

    def begin_drain(self) -> None:
        """Admit nothing from now on: the count is 0, so a running request is preempted when it needs a block."""
        with self.engine_lock:
            self._asleep = True

    def blocks_in_use(self) -> int:
        """Blocks referenced by requests (a drain is done at 0)."""
        with self.engine_lock:
            return self._in_use()

    def finish_drain(self, offload: bool) -> None:
        """No block is referenced: without offload drop the prefix cache and the null block, so that
        every slot can go back (with offload they stay, to be saved)."""
        with self.engine_lock:
            if offload:
                return
            self._stock_counts = True
            try:
                super().reset_prefix_cache()  # every block is free: this cannot fail
            finally:
                self._stock_counts = False
            self._sync(self.blocks[block_id] for block_id, held in enumerate(self._held) if held)
            if self._null_held:
                self.kv_cache.free([self.null_block.block_id])
                self._held[self.null_block.block_id] = 0
                self._null_held = False

    def resume(self, restored: bool) -> None:
        """kvmem's wake hook: admit again; if the saved cache was lost, forget it."""
        with self.engine_lock:
            if not restored:  # kvmem freed every block: no hash may point at them any more
                self._stock_counts = True
                try:
                    super().reset_prefix_cache()
                finally:
                    self._stock_counts = False
                self._held = bytearray(self.num_gpu_blocks)
                self._null_held = False
            self._deny_until = 0.0
            self._asleep = False


# ---- the scheduler side (installed by `install_scheduler_patches`) ----


def _with_demand_hint(stock: Callable) -> Callable:
    """Wrap `KVCacheCoordinator.get_num_blocks_to_allocate`: tell a kvmem pool what is coming."""

    def get_num_blocks_to_allocate(self, *args, **kwargs) -> int:
        num_blocks = stock(self, *args, **kwargs)
        if isinstance(self.block_pool, KvmemBlockPool):
            self.block_pool.prepare(num_blocks)
        return num_blocks

    get_num_blocks_to_allocate.__kvmem_stock__ = stock
    get_num_blocks_to_allocate.__doc__ = stock.__doc__
    return get_num_blocks_to_allocate


def _holding_the_pool(stock: Callable) -> Callable:
    """Wrap `Scheduler.schedule`: hold a kvmem pool's lock for the whole step (module docstring)."""

    def schedule(self, *args, **kwargs):
        pool = getattr(getattr(self, "kv_cache_manager", None), "block_pool", None)
        if isinstance(pool, KvmemBlockPool):
            with pool.engine_lock:
                return stock(self, *args, **kwargs)
        return stock(self, *args, **kwargs)

    schedule.__kvmem_stock__ = stock
    schedule.__doc__ = stock.__doc__
    return schedule


def install_scheduler_patches() -> None:
    """Make vLLM's scheduler build `KvmemBlockPool`s and work with them. Idempotent.

    Replaces `BlockPool` where `vllm/v1/core/kv_cache_coordinator.py` looks it up, and wraps
    `KVCacheCoordinator.get_num_blocks_to_allocate` (the demand hint) and `Scheduler.schedule`
    (the step holds the pool's lock).
    """
    from vllm.v1.core import kv_cache_coordinator
    from vllm.v1.core.sched.scheduler import Scheduler

    kv_cache_coordinator.BlockPool = KvmemBlockPool
    coordinator = kv_cache_coordinator.KVCacheCoordinator
    if not hasattr(coordinator.get_num_blocks_to_allocate, "__kvmem_stock__"):
        coordinator.get_num_blocks_to_allocate = _with_demand_hint(coordinator.get_num_blocks_to_allocate)
    if not hasattr(Scheduler.schedule, "__kvmem_stock__"):
        Scheduler.schedule = _holding_the_pool(Scheduler.schedule)
