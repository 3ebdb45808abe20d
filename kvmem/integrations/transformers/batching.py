"""kvmem storage for transformers' continuous batching (`generate_batch` and its manager).

Design note
-----------
transformers' `PagedAttentionCache` (generation/continuous_batching/cache.py, 5.23.0, 5.24.0) keeps the
whole cache in one flat tensor made up front, cut into *sectors* that a `CachePool` hands to
*cache allocators*; the full-attention allocator cuts a sector into blocks laid out block-major
(``[L0 K | L0 V | L1 K | L1 V]`` per block), with two never-allocated "trash" sectors first for
padding tokens. kvmem keeps the opposite layout, one tensor per layer's K and per layer's V (the
strides paged-attention kernels expect), and maps memory only as blocks are used. So
`KvmemPagedAttentionCache` keeps transformers' scheduling, block tables, prefix sharing and
read/write-index machinery, and swaps out the storage underneath it:

- one HF sector = one HF block = one kvmem block (``page_size`` tokens of every layer's K and V);
- the pool takes a block from kvmem when HF allocates a sector and gives it back to kvmem as soon
  as HF frees the block (HF's own pool keeps freed blocks until it needs sectors);
- the allocator's per-layer token views are kvmem's ``k[layer]``/``v[layer]`` flattened to
  ``[tokens, kv_heads, head_dim]``: token ``t`` of block ``b`` is row ``b * page_size + t``, so
  the allocator's block stride is one page instead of HF's ``2 * layers`` pages; its page views
  (for flash's block-table path) are kvmem's tensors as they are;
- the trash is one kvmem block held for the cache's lifetime: padding reads its zeroed first
  token and writes its second.

Admission is elastic: where HF checks a count of free sectors, `can_store_request_tokens` asks
kvmem for the blocks (all at once); a refusal (limit, budget, capacity) is answered "does not
fit", which HF's scheduler already handles (the request waits, or a running one is evicted and
re-queued). The free-sector count HF reads for its safety margin is kvmem's unused virtual
capacity: the budget or limit behind it is known only by asking.

How it is hooked in: `ContinuousBatchingManager._create_batch_processor` (continuous_api.py)
calls the module-level name ``PagedAttentionCache``. While a `kvmem_continuous_batching` scope is
open that name is a factory that builds a `KvmemPagedAttentionCache` for the scope's model (its
text config, by identity) and HF's own class for any other model; the original name is restored
when the last scope closes.

Not supported (they raise): sliding-window or hybrid models (only full-attention layers), tensor
parallelism, and HF's CPU offloading of the cache (``cpu_offload_space``; it copies block-major
byte rows, and kvmem has its own host tier).

Blocks go back to kvmem when a request's blocks are freed, when HF resets the cache, when the
cache object is garbage-collected (the manager is gone) and, at the latest, when the scope closes.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from kvmem.cache import ElasticKVCache, KVCacheFull
from kvmem.integrations.transformers.cache import (  # checks the transformers version first
    KvmemCacheFull,
    model_geometry,
)
from kvmem.session import Session

# isort: off
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import continuous_api
from transformers.generation.continuous_batching.cache import (
    PagedAttentionCache,
    PagedAttentionMemoryHandler,
    group_layers_by_attn_type,
)
from transformers.generation.continuous_batching.cache_allocators import (
    FULL_ATTENTION,
    CachePool,
    FullAttentionCacheAllocator,
)
from transformers.generation.continuous_batching.cache_allocators.cache_pool import RegularTrees
from transformers.generation.continuous_batching.requests import RequestState

# isort: on

logger = logging.getLogger(__name__)


class _KvmemPool(CachePool):
    """HF's sector pool where a sector is one kvmem block, taken from kvmem on demand and returned when freed."""

    def __init__(self, kv: ElasticKVCache):
        self.kv = kv
        self.held: set[int] = set()  # blocks taken from kvmem by this pool (not the trash)
        super().__init__(kv.max_blocks, num_allocators=1, num_reserved_sectors=0)

    @property
    def free_sectors(self) -> range:
        """What HF counts as free sectors (only its length is read): kvmem's unused virtual capacity."""
        return range(self.kv.max_blocks - self.kv.get_num_used_blocks())

    def reset(self) -> None:
        """Give every block this pool holds back to kvmem and forget the free-block trees."""
        if self.held:
            self.kv.free(sorted(self.held))
            self.held.clear()
        self._free_blocks = [RegularTrees(n) for n in self.blocks_per_sector]

    def take_sectors(self, index: int, count: int) -> None:
        """Take `count` blocks from kvmem as free blocks of allocator `index`; all or nothing.

        Raises:
            KvmemCacheFull: kvmem has not the blocks; nothing was taken.
        """
        try:
            blocks = self.kv.alloc(count)
        except KVCacheFull as exc:
            raise KvmemCacheFull(
                exc.requested, exc.available, replace(exc.shortfall, detail="continuous batching needs more blocks")
            ) from exc
        self.held.update(blocks)
        for block in blocks:
            self._free_blocks[index].add_tree(block)  # a one-block tree: the sector is the block

    def allocate_sector(self, index: int) -> None:
        """HF's single-sector allocation (used when forking requests).

        Raises:
            KvmemCacheFull: kvmem has no block to give.
        """
        self.take_sectors(index, 1)

    def try_to_free_sectors(self) -> None:
        """Give back to kvmem the blocks taken but not handed to any request."""
        for trees in self._free_blocks:
            self._give_back(trees.delete_full_trees())

    def free_blocks(self, index: int, block_ids: list[int]) -> None:
        """Blocks HF no longer needs go straight back to kvmem."""
        self._give_back(block_ids)

    def _give_back(self, blocks: list[int]) -> None:
        if blocks:
            self.held.difference_update(blocks)
            self.kv.free(list(blocks))


class _KvmemFullAttentionAllocator(FullAttentionCacheAllocator):
    """HF's full-attention allocator with kvmem's per-layer K/V tensors as its storage."""

    def attach(self, kv: ElasticKVCache, pool: _KvmemPool, trash_block: int) -> None:
        """Use `kv`'s tensors and `pool`'s blocks (instead of HF's `register_cache_tensor`)."""
        page = self.tokens_per_page
        # HF's stride between blocks in the token views is 2 * layers pages (block-major storage); in kvmem's
        # per-layer tensors consecutive blocks are one page apart.
        self.block_physical_stride = page
        self.num_blocks = kv.max_blocks
        self.blocks_per_sector = 1
        self.pool = pool
        pool.set_blocks_per_sector(self.index, 1)
        # Padding tokens read the (zeroed) first token of the trash block and write its second one.
        self.read_trash_index = trash_block * page
        self.write_trash_index = trash_block * page + 1
        self._kv = kv
        shape = (-1, self.num_key_value_heads, self.head_dim)
        self._kv_token_views = {
            layer: (kv.k[layer].view(shape), kv.v[layer].view(shape)) for layer in self.layer_indices
        }
        self._kv_page_views = {layer: (kv.k[layer], kv.v[layer]) for layer in self.layer_indices}

    def copy_blocks(self, source_block_ids: list[int], dest_block_ids: list[int]) -> None:
        """Copy whole blocks (K and V of every layer), for forked requests."""
        device = self._kv.k[0].device
        source = torch.tensor(source_block_ids, dtype=torch.long, device=device)
        dest = torch.tensor(dest_block_ids, dtype=torch.long, device=device)
        for layer in self.layer_indices:
            for tensor in (self._kv.k[layer], self._kv.v[layer]):
                tensor.index_copy_(0, dest, tensor.index_select(0, source))


class KvmemPagedAttentionCache(PagedAttentionCache):
    """transformers' continuous-batching cache with its storage in a kvmem `ElasticKVCache`.

    Made by the factory a `kvmem_continuous_batching` scope installs; the arguments after `kv` are
    the ones transformers' manager passes to `PagedAttentionCache`.

    Args:
        kv: The kvmem cache: the model's layers, kv heads and head size, layout "NHD", dtype the
            model's, ``block_size == continuous_batching_config.page_size``.
        config: The model's text config.
        continuous_batching_config: The manager's continuous batching config.
        device: The model's device (the kvmem cache's).
        distributed_helper: HF's tensor-parallel helper (tensor parallelism is not supported).
        dtype: The model's dtype.
        model_supports_logits_to_keep: Unused: kvmem does not size the cache from free memory.

    Raises:
        ValueError: The kvmem cache does not fit the model or the config.
        NotImplementedError: Sliding-window layers, tensor parallelism or CPU offloading asked for.
        KvmemCacheFull: kvmem cannot give the trash block.
    """

    def __init__(
        self,
        kv: ElasticKVCache,
        config: Any,
        continuous_batching_config: ContinuousBatchingConfig,
        device: torch.device | str,
        distributed_helper: Any,
        dtype: torch.dtype = torch.float16,
        model_supports_logits_to_keep: bool = False,
    ) -> None:
        cb = continuous_batching_config
        groups = group_layers_by_attn_type(config)
        if set(groups) != {FULL_ATTENTION}:
            raise NotImplementedError(f"kvmem continuous batching supports full-attention models only, not {groups}")
        if distributed_helper.tp_size > 1:
            raise NotImplementedError("kvmem continuous batching does not support tensor parallelism")
        if cb.cpu_offload_space is None or cb.cpu_offload_space > 0:
            raise NotImplementedError("kvmem continuous batching does not support cpu_offload_space: set it to 0")
        if kv.k is None:
            raise ValueError(f"the kvmem cache on {kv.device.kind} has no torch tensors in this process")
        num_layers, num_kv_heads, head_dim = model_geometry(config)
        want = (num_layers, cb.page_size, num_kv_heads, head_dim, dtype, "NHD", torch.device(device).type)
        got = (kv.num_layers, kv.block_size, kv.num_kv_heads, kv.head_dim, kv.dtype, kv.layout, kv.k[0].device.type)
        if got != want:
            raise ValueError(
                "the kvmem cache (layers, block size, kv heads, head dim, dtype, layout, device) = "
                f"{got} does not fit the model and continuous batching config: {want} (page_size is the block size)"
            )
        self.config, self.dtype, self.device = config, dtype, device
        self.max_blocks_per_request = cb.max_blocks_per_request or 0
        allocator = _KvmemFullAttentionAllocator(
            index=0,
            config=config,
            num_key_value_heads=num_kv_heads,
            cache_dtype=dtype,
            page_size=cb.page_size,
            layer_indices=groups[FULL_ATTENTION],
            allow_block_sharing=cb.allow_block_sharing,
        )
        self.cache_allocators = {FULL_ATTENTION: allocator}
        self.layer_to_allocator = dict.fromkeys(groups[FULL_ATTENTION], allocator)
        self.bytes_per_sector = allocator.bytes_per_block
        self.tokens_per_sector = allocator.tokens_per_page
        # HF sizes max_batch_tokens from free memory when unset; kvmem grows the cache instead, so take HF's default.
        self.max_batch_tokens = cb.max_batch_tokens or PagedAttentionMemoryHandler._default_max_batch_tokens
        try:
            trash_block = kv.alloc(1)[0]
        except KVCacheFull as exc:
            shortfall = replace(exc.shortfall, detail="no block for the padding trash")
            raise KvmemCacheFull(exc.requested, exc.available, shortfall) from exc
        for layer in range(num_layers):
            kv.k[layer][trash_block].zero_()
            kv.v[layer][trash_block].zero_()
        self.pool = _KvmemPool(kv)
        self.num_sectors = self.num_blocks = kv.max_blocks
        allocator.attach(kv, self.pool, trash_block)
        self.allow_block_sharing = cb.allow_block_sharing
        self.use_prefix_sharing = allocator.use_block_sharing and self.allow_block_sharing
        self.read_cache_limit = self._infer_read_cache_limit()
        self.max_decode_fast_path_length = self._infer_max_decode_fast_path_length()
        # HF sizes its per-batch read-index and mask buffers by this: the kvmem cache's capacity in tokens.
        self.max_tokens_read = allocator.tokens_per_page * allocator.num_blocks
        self.released = False
        self._release = weakref.finalize(self, _release_storage, self.pool, kv, trash_block)

    def can_store_request_tokens(self, state: RequestState, request_len: int, dry_run: bool = False) -> bool:
        """Make room for `request_len` more tokens of `state`'s request, taking blocks from kvmem.

        Returns False (and changes nothing) when kvmem cannot give the blocks now; with `dry_run`,
        only estimates from the unused virtual capacity.

        Raises:
            RuntimeError: The cache was released (its manager outlived the kvmem scope).
        """
        if self.released:
            raise RuntimeError("kvmem storage released: a continuous batching manager outlived its kvmem scope")
        allocator = self.cache_allocators[FULL_ATTENTION]
        past = state.current_len()
        sectors = allocator.needs_new_sectors(state.request_id, past, request_len)
        if dry_run:
            return self.pool.num_free_sectors >= sectors
        if sectors:
            try:
                self.pool.take_sectors(allocator.index, sectors)
            except KvmemCacheFull as exc:
                logger.debug("kvmem refused %d blocks for request %s: %s", sectors, state.request_id, exc)
                return False
        allocator.allocate_cache_to_request(state.request_id, past, request_len)
        return True

    def release(self) -> None:
        """Forget every request and give every block (the trash included) back to kvmem. Idempotent.

        Afterwards the cache holds nothing and admits nothing: `can_store_request_tokens` raises.
        """
        self.released = True
        self.free_all_requests(clear_ledgers=True)
        self._release()


def _release_storage(pool: _KvmemPool, kv: ElasticKVCache, trash_block: int) -> None:
    pool.reset()
    kv.free([trash_block])


# ---- the hook: the name continuous_api calls, while kvmem scopes are open ----

_lock = threading.Lock()
_scopes: list[_Scope] = []


class _Scope:
    """One open `kvmem_continuous_batching`: the model's text config, its kvmem cache and the caches made."""

    def __init__(self, config: Any, kv: ElasticKVCache):
        self.config = config
        self.kv = kv
        self.caches: weakref.WeakSet[KvmemPagedAttentionCache] = weakref.WeakSet()


def _paged_attention_cache(**kwargs: Any) -> PagedAttentionCache:
    """Stands for `PagedAttentionCache` in continuous_api: kvmem storage for a scoped model, HF's otherwise."""
    with _lock:
        scope = next((s for s in reversed(_scopes) if s.config is kwargs["config"]), None)
    if scope is None:
        return PagedAttentionCache(**kwargs)
    cache = KvmemPagedAttentionCache(scope.kv, **kwargs)
    scope.caches.add(cache)
    return cache


def _enter(scope: _Scope) -> None:
    with _lock:
        if not _scopes:
            if continuous_api.PagedAttentionCache is not PagedAttentionCache:
                raise RuntimeError(
                    "transformers' continuous_api.PagedAttentionCache is already replaced by "
                    f"{continuous_api.PagedAttentionCache!r}: kvmem cannot hook in"
                )
            continuous_api.PagedAttentionCache = _paged_attention_cache
        _scopes.append(scope)


def _leave(scope: _Scope) -> None:
    with _lock:
        _scopes.remove(scope)
        if not _scopes:
            continuous_api.PagedAttentionCache = PagedAttentionCache


@contextmanager
def kvmem_continuous_batching(
    model: Any,
    source: Session | ElasticKVCache,
    *,
    max_tokens: int | None = None,
    block_size: int | None = None,
    **cache_options: Any,
) -> Iterator[ElasticKVCache]:
    """Keep `model`'s continuous-batching KV cache in kvmem blocks while the scope is open.

    Covers every entry point that builds a manager inside the scope: `generate_batch`,
    `continuous_batching_context_manager`, `init_continuous_batching`.

    Args:
        model: A transformers model with full-attention layers.
        source: A kvmem `Session` (the scope makes an `ElasticKVCache` on it and closes it on exit)
            or an `ElasticKVCache` fitting the model (left open).
        max_tokens: The cache's virtual capacity in tokens (required with a `Session`).
            transformers sizes its per-batch read-index and attention-mask buffers by it
            (``max_batch_tokens * (max_tokens + max_batch_tokens)`` mask entries), so keep it to
            what a batch may read.
        block_size: Tokens per block (with a `Session`); it must equal the continuous batching
            config's ``page_size``, whose default it takes.
        **cache_options: Passed to `Session.kv_cache` (watermarks, grow_wait, background).

    Yields:
        The kvmem cache in use.

    Raises:
        ValueError: `max_tokens` missing with a `Session`.
        RuntimeError: The hook point is already replaced by someone else.

    On exit every block any cache of the scope still holds goes back to kvmem. A manager kept
    alive past the scope (``persistent_manager=True``) must not be used afterwards: it raises.
    """
    if isinstance(source, Session):
        if max_tokens is None:
            raise ValueError("max_tokens is required: the kvmem cache's capacity, which sizes HF's batch buffers")
        num_layers, num_kv_heads, head_dim = model_geometry(model.config)
        page = ContinuousBatchingConfig().page_size if block_size is None else block_size
        kv = source.kv_cache(
            num_layers, page, num_kv_heads, head_dim, model.dtype, max_tokens, layout="NHD", **cache_options
        )
        owned = True
    else:
        kv, owned = source, False
    scope = _Scope(model.config.get_text_config(), kv)
    try:
        _enter(scope)
        try:
            yield kv
        finally:
            _leave(scope)
            for cache in list(scope.caches):
                cache.release()
    finally:
        if owned:
            kv.close()
