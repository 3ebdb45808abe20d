"""vLLM's KV-cache tensors on a kvmem reservation: the worker's session, its cache, `allocate_kv_cache`.

Design note
-----------
vLLM 0.32 allocates every layer's KV cache in `vllm/v1/worker/utils.py` `allocate_kv_cache`:
one flat `torch.zeros(size, int8)` buffer shared by all `KVCacheTensor`s, then per-layer views
made by `create_kv_cache_views` from each tensor's `offset`, `layer_stride` and `block_stride`.
`kvmem_allocate_kv_cache` keeps that exactly, views and all, and changes only where the bytes
come from: the flat buffer is the reservation of a kvmem `ElasticKVCache` laid out so that vLLM
block ``b`` is kvmem block ``b`` (`kvmem.integrations.vllm.geometry`). Nothing is mapped but the
first page slot: vLLM's block tables are padded with block 0 (its null block) and warm-up runs
read it. Every other slot is mapped when the scheduler's block pool hands out one of its blocks
(`kvmem.integrations.vllm.pool`), which finds this cache through `cache_for_pool` when vLLM runs
its one worker in the engine-core process (`UniProcExecutor`, `vllm/v1/executor/uniproc_executor.py`),
the process that also runs the scheduler. With worker processes (`MultiprocExecutor`: TP>1, and
vLLM's CPU platform) the pool maps slots on every rank's cache through vLLM's executor instead
(`ranked_cache`, `rank`).

The one exception is an allocation made while vLLM profiles memory (`budget` sets `profiling`):
vLLM's GPU model runner may allocate a minimal KV cache for CUDA-graph profiling
(`GPUModelRunner._init_minimal_kv_cache_for_profiling`) and run the model on it with no block
pool; that cache is mapped whole, and replaced by the real one.

The session is opened once per process, from the environment: KVMEM_DEVICE=host with
KVMEM_BUDGET for `kvmem.local` (no daemon), else `kvmem.connect` to the daemon of the worker's
GPU (on CPU, the host daemon serving as GPU <the worker's local rank>) in KVMEM_RUNTIME_DIR, as
model KVMEM_MODEL or else vLLM's served model name. It is closed at exit, returning every page.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import replace

import torch

from kvmem.cache import ElasticKVCache, KVCacheFull
from kvmem.common.protocol import check_model_name, model_name_from
from kvmem.integrations.vllm import ranked_cache
from kvmem.integrations.vllm.geometry import UnsupportedVllmConfigError, VllmKVGeometry, geometry_of
from kvmem.integrations.vllm.ranked_cache import RankedCache
from kvmem.session import Session, from_environment

logger = logging.getLogger(__name__)

_session: Session | None = None
_cache: ElasticKVCache | None = None
_geometry: VllmKVGeometry | None = None
profiling = False  # set by `budget` while vLLM profiles memory: allocations are mapped whole


def model_name(vllm_config=None) -> str:
    """KVMEM_MODEL, else vLLM's served model name (its first one) from `vllm_config` or the current one,
    made a valid daemon model name (vLLM falls back to the model's path, often long or not a name).

    Raises:
        RuntimeError: Neither is known (no vLLM config and no KVMEM_MODEL), or KVMEM_MODEL is not a valid name.
    """
    name = os.environ.get("KVMEM_MODEL")
    if name:
        try:
            return check_model_name(name)
        except ValueError as exc:
            raise RuntimeError(f"kvmem: KVMEM_MODEL: {exc}") from None
    from vllm.config import get_current_vllm_config_or_none

    config = vllm_config or get_current_vllm_config_or_none()
    served = None if config is None or config.model_config is None else config.model_config.served_model_name
    if isinstance(served, list):
        served = served[0] if served else None
    if not served:
        raise RuntimeError("kvmem: no model name for the daemon; set KVMEM_MODEL")
    return model_name_from(served)


def session(device: torch.device, vllm_config=None, rank: int = 0) -> Session:
    """This process's kvmem session, opened on first use (see the module docstring).

    Args:
        device: The worker's torch device.
        vllm_config: vLLM's config (for the model's name).
        rank: The worker's local rank: on CPU, the host daemon serving as GPU `rank` (each rank of a
            tensor-parallel CPU engine has a daemon of its own, as each GPU has).
    """
    global _session
    if _session is None:
        _session = from_environment(
            device, lambda: model_name(vllm_config), "vLLM's KV cache", RuntimeError, host_gpu=rank
        )
    return _session


def current_cache() -> ElasticKVCache | None:
    """The cache behind this process's vLLM KV tensors, if they are allocated."""
    return _cache


def status_segment() -> str | None:
    """The status segment of this process's daemon (None: no session yet, or no daemon)."""
    return None if _session is None else _session.status_segment


def cache_for_pool(num_blocks: int) -> ElasticKVCache | RankedCache:
    """The provider `pool.set_backing` gets: this process's cache, which must hold `num_blocks`, or,
    where vLLM's workers are processes of their own, the scheduler's view of theirs (`ranked_cache`).

    Raises:
        UnsupportedVllmConfigError: No kvmem cache in this process and no multiprocess executor to
            reach the workers', or a cache of another size.
    """
    if _cache is None or _geometry is None:
        return ranked_cache.for_scheduler(num_blocks)
    if _geometry.num_blocks != num_blocks:
        raise UnsupportedVllmConfigError(
            f"kvmem: vLLM's scheduler has {num_blocks} blocks but its KV tensors {_geometry.num_blocks}"
        )
    return _cache


def close() -> None:
    """Close this process's cache and session, returning every page (also run at exit). Idempotent."""
    global _session, _cache, _geometry
    if _cache is not None:
        _cache.close()
        _cache = _geometry = None
    if _session is not None:
        _session.close()
        _session = None


def _new_cache(s: Session, geometry: VllmKVGeometry) -> ElasticKVCache:
    """A kvmem cache whose ranges are vLLM's layer regions (its reservation holds vLLM's buffer)."""
    global _cache, _geometry
    if _cache is not None:  # a re-allocation (e.g. after vLLM's profiling cache): the old one goes back
        _cache.close()
        _cache = _geometry = None
    page = s.source.page_size
    bps = geometry.blocks_per_slot(page)
    if geometry.num_blocks % bps:
        raise UnsupportedVllmConfigError(
            f"kvmem: vLLM's {geometry.num_blocks} KV blocks are not a whole number of page slots of {bps} blocks "
            "(is num_gpu_blocks_override set to a value kvmem could not round?)"
        )
    cache = ElasticKVCache(
        s.source,
        num_layers=geometry.kvmem_layers,
        block_size=1,
        num_kv_heads=1,
        head_dim=geometry.block_stride,
        dtype="int8",
        max_tokens=geometry.num_blocks,
        # No growth ahead of demand: the block pool maps the slots of the blocks it hands out.
        # Empty slots go back once a slot's worth more than one slot of blocks is free.
        low_watermark=0,
        high_watermark=bps,
    )
    assert cache.blocks_per_slot == bps and cache.range_bytes == geometry.region_bytes
    _cache, _geometry = cache, geometry
    return cache


def kvmem_allocate_kv_cache(kv_cache_config, device: torch.device, layout, kernel_block_sizes=None):
    """Drop-in for vLLM 0.32's `vllm.v1.worker.utils.allocate_kv_cache`, over a kvmem reservation.

    Args:
        kv_cache_config: vLLM's `KVCacheConfig`.
        device: The worker's torch device.
        layout: vLLM's resolved `KVCacheLayout`.
        kernel_block_sizes: Kernel block size per cache group, as vLLM passes it.

    Returns:
        Layer name -> KV cache view, the same views vLLM would make.

    Raises:
        UnsupportedVllmConfigError: The layout or the tensors are not ones kvmem backs (`geometry_of`).
        kvmem.KVCacheFull: kvmem cannot map the first page slot (or, while profiling, the buffer).
        kvmem.common.errors.DaemonUnavailableError: No daemon answers and KVMEM_DEVICE is not "host".
    """
    # The body follows vllm 0.32.0 vllm/v1/worker/utils.py allocate_kv_cache, except for the buffer
    # (and for the ROCm-only page padding, which does not apply: kvmem is CUDA or host).
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs, create_kv_cache_views

    if not kv_cache_config.kv_cache_tensors:
        return {}
    sizes = {tensor.size for tensor in kv_cache_config.kv_cache_tensors}
    # vLLM asserts the same: every KVCacheTensor addresses one backing allocation of `size` bytes.
    assert len(sizes) == 1, "KV cache tensors must share one backing allocation."

    specs = {}
    for group in kv_cache_config.kv_cache_groups:
        for layer_name in group.layer_names:
            spec = group.kv_cache_spec
            specs[layer_name] = spec.kv_cache_specs[layer_name] if isinstance(spec, UniformTypeKVCacheSpecs) else spec
    if any(
        n != kv_cache_config.num_blocks for n in map(kv_cache_config.num_blocks_of, kv_cache_config.kv_cache_tensors)
    ):
        raise UnsupportedVllmConfigError("kvmem: vLLM's KV tensors differ in block count (a host-resident pool?)")
    geometry = geometry_of(kv_cache_config, layout, {name: spec.has_layer_views for name, spec in specs.items()})
    cache = _new_cache(session(device), geometry)
    slots = range(cache.max_slots) if profiling else [0]
    shortfall = cache.map_slots(slots)
    if shortfall is not None:
        detail = f"kvmem could not map vLLM's KV cache: {shortfall.detail}"
        raise KVCacheFull(len(slots) * cache.blocks_per_slot, 0, replace(shortfall, detail=detail))
    buf = cache.reservation_tensor()[: geometry.size].view(torch.int8)
    if buf.device != torch.device(device):
        raise RuntimeError(f"kvmem: the reservation is on {buf.device}, but vLLM's KV cache belongs on {device}")
    logger.info(
        "kvmem: vLLM KV cache of %d blocks (%d bytes) over kvmem, %d blocks per page slot, %s",
        geometry.num_blocks,
        geometry.size,
        cache.blocks_per_slot,
        "mapped whole for profiling" if profiling else "mapped as blocks are used",
    )

    kv_caches: dict[str, torch.Tensor] = {}
    for tensor in kv_cache_config.kv_cache_tensors:
        layer_name = tensor.layers[0]
        group_id = next(
            group_id
            for group_id, group in enumerate(kv_cache_config.kv_cache_groups)
            if layer_name in group.layer_names
        )
        kernel_block_size = None
        if kernel_block_sizes is not None and group_id < len(kernel_block_sizes):
            kernel_block_size = kernel_block_sizes[group_id]
        views = create_kv_cache_views(
            buf, specs[layer_name], geometry.num_blocks, layout, tensor, kernel_block_size=kernel_block_size
        )
        kv_caches.update(zip(tensor.layers, views, strict=True))
    return kv_caches


atexit.register(close)
