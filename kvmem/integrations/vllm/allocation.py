"""vLLM's KV-cache tensors on a kvmem reservation: a replacement for `allocate_kv_cache`.

Design note
-----------
vLLM 0.32 allocates every layer's KV cache in `vllm/v1/worker/utils.py` `allocate_kv_cache`:
one flat `torch.zeros(size, int8)` buffer shared by all `KVCacheTensor`s, then per-layer views
made by `create_kv_cache_views` from each tensor's `offset`, `layer_stride` and `block_stride`.
`kvmem_allocate_kv_cache` keeps that exactly, views and all, and changes only where the bytes
come from: the flat buffer is the reservation of a kvmem `ElasticKVCache`
(`ElasticKVCache.reservation_tensor`), so the views are vLLM's own over kvmem's pages.

The elastic cache is sized so that its reservation covers vLLM's buffer, with one device page per
kvmem block (block_size 1, one head, int8, head_dim = the page size), so blocks and slots are
pages. vLLM's own block pool still owns block placement and may write any block at any time, so
this first part maps every page at allocation (`alloc` of every block) and holds them until the
process exits; pages from the daemon are zeroed, as `torch.zeros` was. Elastic growth (a block
pool whose free blocks come from kvmem) is the next part and not done here.

The session is opened at the first allocation, in the worker process, from the environment:
KVMEM_DEVICE=host with KVMEM_BUDGET for `kvmem.local` (no daemon), else `kvmem.connect` to the
daemon of the worker's GPU (host daemons serve as GPU 0) in KVMEM_RUNTIME_DIR, as model
KVMEM_MODEL or else vLLM's served model name. It is closed at exit, returning every page.
"""

from __future__ import annotations

import atexit
import logging
import os

import torch

import kvmem
from kvmem.session import Session

logger = logging.getLogger(__name__)

_session: Session | None = None


def model_name() -> str:
    """KVMEM_MODEL, else vLLM's served model name (its first one).

    Raises:
        RuntimeError: Neither is known (no current vLLM config and no KVMEM_MODEL).
    """
    name = os.environ.get("KVMEM_MODEL")
    if name:
        return name
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    served = None if config is None or config.model_config is None else config.model_config.served_model_name
    if isinstance(served, list):
        served = served[0] if served else None
    if not served:
        raise RuntimeError("kvmem: no model name for the daemon; set KVMEM_MODEL")
    return served


def open_session(device: torch.device) -> Session:
    """The kvmem session for this process, from the environment (see the module docstring)."""
    if os.environ.get("KVMEM_DEVICE") == "host":
        if device.type != "cpu":
            raise RuntimeError(f"kvmem: KVMEM_DEVICE=host gives CPU memory, but vLLM's KV cache is on {device}")
        return kvmem.local(device="host", budget=os.environ.get("KVMEM_BUDGET"))
    gpu = (device.index or 0) if device.type == "cuda" else 0
    return kvmem.connect(model_name(), gpu=gpu, runtime_dir=os.environ.get("KVMEM_RUNTIME_DIR"))


def close_session() -> None:
    """Close this process's kvmem session, returning every page (also run at exit). Idempotent."""
    global _session
    if _session is not None:
        _session.close()
        _session = None


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
        kvmem.KVCacheFull: kvmem cannot supply the whole buffer (budget or limit too small).
        kvmem.client.DaemonUnavailableError: No daemon answers and KVMEM_DEVICE is not "host".
    """
    # The body follows vllm 0.32.0 vllm/v1/worker/utils.py allocate_kv_cache line by line, except
    # for the buffer (and for the ROCm-only page padding, which does not apply: kvmem is CUDA or host).
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs, create_kv_cache_views

    global _session
    if not kv_cache_config.kv_cache_tensors:
        return {}
    sizes = {tensor.size for tensor in kv_cache_config.kv_cache_tensors}
    # vLLM asserts the same: every KVCacheTensor addresses one backing allocation of `size` bytes.
    assert len(sizes) == 1, "KV cache tensors must share one backing allocation."
    buf_size = sizes.pop()

    close_session()  # a re-allocation (e.g. after vLLM's sleep mode) starts from a fresh reservation
    _session = open_session(device)
    page = _session.source.page_size
    pages = -(-buf_size // page)
    # Two ranges (kvmem's K and V of one layer) of ceil(pages / 2) one-page blocks cover the buffer.
    cache = _session.kv_cache(
        num_layers=1, block_size=1, num_kv_heads=1, head_dim=page, dtype="int8", max_tokens=-(-pages // 2)
    )
    cache.alloc(cache.max_blocks)  # vLLM's block pool may use any block: map every page now
    buf = cache.reservation_tensor()[:buf_size].view(torch.int8)
    if buf.device != torch.device(device):
        raise RuntimeError(f"kvmem: the reservation is on {buf.device}, but vLLM's KV cache belongs on {device}")
    logger.info("kvmem: vLLM KV cache of %d bytes on %d kvmem pages", buf_size, pages)

    kv_caches: dict[str, torch.Tensor] = {}
    for tensor in kv_cache_config.kv_cache_tensors:
        layer_name = tensor.layers[0]
        group_id, group = next(
            (group_id, group)
            for group_id, group in enumerate(kv_cache_config.kv_cache_groups)
            if layer_name in group.layer_names
        )
        spec = group.kv_cache_spec
        if isinstance(spec, UniformTypeKVCacheSpecs):
            spec = spec.kv_cache_specs[layer_name]
        if not spec.has_layer_views:
            kv_caches.update((name, buf) for name in tensor.layers)
            continue
        num_blocks = kv_cache_config.num_blocks_of(tensor)
        kernel_block_size = None
        if kernel_block_sizes is not None and group_id < len(kernel_block_sizes):
            kernel_block_size = kernel_block_sizes[group_id]
        views = create_kv_cache_views(buf, spec, num_blocks, layout, tensor, kernel_block_size=kernel_block_size)
        kv_caches.update(zip(tensor.layers, views, strict=True))
    return kv_caches


atexit.register(close_session)
