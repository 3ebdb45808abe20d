"""How vLLM's KV cache buffer maps onto a kvmem cache: regions, block stride, page slots.

Design note
-----------
vLLM 0.32 puts every layer's KV cache in one flat buffer (`vllm/v1/worker/utils.py`
`allocate_kv_cache`) laid out by `vllm/v1/core/kv_cache_utils.py`
`get_kv_cache_config_from_groups`: a `KVCacheTensor` places layer ``l``'s page of block ``b`` at
``offset + l * layer_stride + b * block_stride``. In the layer-outermost, block-compact layouts
(`KVCacheLayout.LBNHC` and `LBHNC`: L is the outermost axis and B the next, so a block's bytes in a
layer are one contiguous run) every layer owns a *region* of ``num_blocks * block_stride`` bytes,
block ``b`` at ``b * block_stride`` in it; cache groups alias the same regions from byte 0 (a
block id belongs to one group at a time). The CPU backend asks for LBHNC
(`vllm/v1/attention/backends/cpu_attn.py`); backends without a preference get the default.

That is exactly a kvmem `ElasticKVCache` whose ranges are those regions: kvmem block ``b`` of
range ``r`` is at ``r * range_bytes + b * block_bytes``. So the kvmem cache is made with
``block_bytes = block_stride`` (block_size 1, one head, int8, head_dim = the stride) and
``range_bytes = num_blocks * block_stride``, which needs `num_blocks` to be a whole number of page
slots (`blocks_per_slot`); `kvmem.integrations.vllm.budget` rounds vLLM's block count to that.
Then vLLM block ``b`` *is* kvmem block ``b``, and mapping kvmem slot ``s`` backs vLLM blocks
``s * blocks_per_slot`` to ``(s + 1) * blocks_per_slot - 1`` in every layer at once. kvmem's
ranges come in K/V pairs (``2 * num_layers``); with an odd number of regions the last range is
a spare that vLLM never touches (its pages are mapped with each slot: ``1 / (regions + 1)`` more
memory, documented in the README).

Other layouts (block-outermost BL*, head-outer LH*) and raw per-layer buffers (Mamba state) are
refused with `UnsupportedVllmConfigError`: a block's bytes would not sit at one offset per
region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class UnsupportedVllmConfigError(RuntimeError):
    """KVMEM=1 is set but this vLLM engine's configuration is one kvmem cannot back (the message says why)."""


@dataclass(frozen=True)
class VllmKVGeometry:
    """vLLM's KV buffer in kvmem terms.

    Attributes:
        num_blocks: vLLM's block count (`KVCacheConfig.num_blocks`).
        block_stride: Bytes between consecutive blocks of one layer: kvmem's block size.
        regions: Layer regions of ``num_blocks * block_stride`` bytes each.
        size: Bytes of vLLM's buffer (``regions * num_blocks * block_stride``).
    """

    num_blocks: int
    block_stride: int
    regions: int
    size: int

    @property
    def region_bytes(self) -> int:
        return self.num_blocks * self.block_stride

    @property
    def kvmem_layers(self) -> int:
        """kvmem layers (K/V range pairs) covering the regions."""
        return -(-self.regions // 2)

    def blocks_per_slot(self, page_size: int) -> int:
        return blocks_per_slot(self.block_stride, page_size)


def blocks_per_slot(block_stride: int, page_size: int) -> int:
    """vLLM blocks in one kvmem page slot (`ElasticKVCache.blocks_per_slot` for this stride)."""
    return math.lcm(block_stride, page_size) // block_stride


def geometry_of(kv_cache_config: Any, layout: Any, layer_views: dict[str, bool]) -> VllmKVGeometry:
    """Read the geometry off a vLLM `KVCacheConfig` and its resolved `KVCacheLayout`.

    Args:
        kv_cache_config: vLLM's `KVCacheConfig` (``num_blocks``, ``kv_cache_tensors`` with
            ``size``, ``layers``, ``layer_stride``, ``block_stride``, ``offset``).
        layout: vLLM's `KVCacheLayout` (``name``, ``is_layer_compact``, ``is_block_compact``).
        layer_views: Layer name -> whether its spec has per-layer views (``spec.has_layer_views``).

    Raises:
        UnsupportedVllmConfigError: The layout or the tensors are not the layer-region kind
            (see the module docstring).
    """
    tensors = kv_cache_config.kv_cache_tensors
    num_blocks = kv_cache_config.num_blocks
    if not (layout.is_layer_compact and layout.is_block_compact):
        raise UnsupportedVllmConfigError(
            f"kvmem backs vLLM's layer-outer KV cache layouts (LBNHC, LBHNC); this engine resolved {layout.name}: "
            "set VLLM_KV_CACHE_LAYOUT=LBNHC (or LBHNC) if the attention backend accepts it"
        )
    raw = sorted(name for tensor in tensors for name in tensor.layers if not layer_views[name])
    if raw:
        raise UnsupportedVllmConfigError(
            f"kvmem backs attention KV caches only; layer {raw[0]} has a raw state buffer (e.g. Mamba)"
        )
    strides = {tensor.block_stride for tensor in tensors}
    if len(strides) != 1:
        raise UnsupportedVllmConfigError(
            f"kvmem needs one block stride for every layer; this model's KV cache has {sorted(strides)}"
        )
    stride = strides.pop()
    region = num_blocks * stride
    regions = 0
    for tensor in tensors:
        if tensor.layer_stride != region or tensor.offset % region:
            raise UnsupportedVllmConfigError(
                f"kvmem needs each layer in a region of num_blocks * block_stride = {region} bytes; layers "
                f"{tensor.layers[0]}.. have layer_stride {tensor.layer_stride} at offset {tensor.offset}"
            )
        regions = max(regions, tensor.offset // region + len(tensor.layers))
    size = tensors[0].size
    if size != regions * region:
        raise UnsupportedVllmConfigError(
            f"vLLM's KV buffer is {size} bytes, not the {regions} regions of {region} bytes kvmem would back"
        )
    return VllmKVGeometry(num_blocks=num_blocks, block_stride=stride, regions=regions, size=size)
