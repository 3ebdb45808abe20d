"""Torch reference implementations of kvmem's KV data-movement kernels.

Design note
-----------
Each function here has the contract of its namesake in `kvmem.kernels` (which validates the
arguments and then calls either this module or `kvmem.kernels.triton_kernels`): the Triton
kernels are tested against these, bit for bit, and these are what runs on CPU tensors when the
Triton interpreter is off. They are written for clarity with whole-tensor torch operations, and
move data through integer views of the caches (same element width), so copies are bit exact for
every dtype and no torch operation has to support float8 indexing. Arguments are assumed valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0  # symmetric int8: -127..127, so that q * scale is symmetric around zero

_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def words(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` viewed as unsigned/signed integers of the same width (its storage words)."""
    return tensor.view(_WORDS[tensor.element_size()])


def block_size_of(cache: torch.Tensor, layout: str) -> int:
    return cache.shape[1] if layout == "NHD" else cache.shape[2]


def to_cache_dtype(rows: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """Rows ``[T, H, D]`` converted to a cache's dtype, as `write_kv` stores them.

    float16/bfloat16/float32: a plain conversion (round to nearest even; NaN stays a NaN, whose
    bits are not part of the contract: torch's differ between its code paths). float8_e4m3fn:
    ``x / scale`` in float32, clamped to +-448, rounded to nearest even. int8: ``x / scale``
    rounded to nearest even and clamped to +-127 (NaN -> 0). `scale` holds 1 or H float32 values.
    """
    if rows.dtype == dtype:
        return rows
    if scale is None:
        return rows.to(dtype)
    scaled = rows.float() / scale.reshape(1, -1, 1)
    if dtype == torch.float8_e4m3fn:
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch.round(torch.nan_to_num(scaled, nan=0.0).clamp(-INT8_MAX, INT8_MAX)).to(torch.int8)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: str,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> None:
    """Reference of `kvmem.kernels.write_kv`: slots outside ``[0, blocks * block_size)`` are skipped."""
    block_size = block_size_of(key_cache, layout)
    slots = slot_mapping.to(torch.int64)
    keep = (slots >= 0) & (slots < key_cache.shape[0] * block_size)
    slots = slots[keep]
    blocks, offsets = slots // block_size, slots % block_size
    for rows, cache, scale in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
        data = words(to_cache_dtype(rows[keep], cache.dtype, scale))
        if layout == "NHD":
            words(cache)[blocks, offsets] = data
        else:
            words(cache)[blocks, :, offsets] = data


def _ranges(k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor]) -> list[tuple[int, int, torch.Tensor]]:
    """(layer, kind, cache) for every range, kind 0 = K, 1 = V."""
    return [
        (layer, kind, cache)
        for layer, pair in enumerate(zip(k_caches, v_caches, strict=True))
        for kind, cache in enumerate(pair)
    ]


def _kept(block_ids: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in `block_ids` of the ids in range, those ids)."""
    ids = block_ids.to(torch.int64)
    keep = torch.nonzero((ids >= 0) & (ids < num_blocks)).flatten()
    return keep, ids[keep]


def gather_blocks(
    k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor
) -> None:
    """Reference of `kvmem.kernels.gather_blocks`: ``out[i, l, 0] = k_caches[l][block_ids[i]]``."""
    keep, ids = _kept(block_ids, k_caches[0].shape[0])
    for layer, kind, cache in _ranges(k_caches, v_caches):
        words(out)[keep, layer, kind] = words(cache)[ids]


def scatter_blocks(
    buffer: torch.Tensor, k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor], block_ids: torch.Tensor
) -> None:
    """Reference of `kvmem.kernels.scatter_blocks`: ``k_caches[l][block_ids[i]] = buffer[i, l, 0]``."""
    keep, ids = _kept(block_ids, k_caches[0].shape[0])
    for layer, kind, cache in _ranges(k_caches, v_caches):
        words(cache)[ids] = words(buffer)[keep, layer, kind]


def move_blocks(
    k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor], src_ids: torch.Tensor, dst_ids: torch.Tensor
) -> None:
    """Reference of `kvmem.kernels.move_blocks`: block ``src_ids[i]`` -> ``dst_ids[i]`` in every range."""
    num_blocks = k_caches[0].shape[0]
    src, dst = src_ids.to(torch.int64), dst_ids.to(torch.int64)
    keep = (src >= 0) & (src < num_blocks) & (dst >= 0) & (dst < num_blocks)
    for _, _, cache in _ranges(k_caches, v_caches):
        words(cache)[dst[keep]] = words(cache)[src[keep]]


def _head_reduce_dims(layout: str) -> tuple[int, int]:
    """Dims of a ``[n, *block_shape]`` tensor reduced for one scale per head (token and dim)."""
    return (1, 3) if layout == "NHD" else (2, 3)


def _per_head(scales: torch.Tensor, layout: str) -> torch.Tensor:
    """``[n, H]`` scales shaped to broadcast against ``[n, *block_shape]``."""
    return scales[:, None, :, None] if layout == "NHD" else scales[:, :, None, None]


def quantize_blocks_int8(
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    layout: str,
    out: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """Reference of `kvmem.kernels.quantize_blocks_int8`.

    Per block, range and head: ``scale = absmax / 127`` (float32), ``q = round(x / scale)``
    (nearest even, clamped to +-127; 0 where the head is all zeros and so is its scale).
    """
    keep, ids = _kept(block_ids, k_caches[0].shape[0])
    for layer, kind, cache in _ranges(k_caches, v_caches):
        x = cache[ids].float()
        scale = x.abs().amax(dim=_head_reduce_dims(layout)) / INT8_MAX
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((x / _per_head(safe, layout)).clamp(-INT8_MAX, INT8_MAX))
        out[keep, layer, kind] = q.to(torch.int8)
        scales[keep, layer, kind] = scale


def dequantize_blocks_int8(
    q: torch.Tensor,
    scales: torch.Tensor,
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    layout: str,
) -> None:
    """Reference of `kvmem.kernels.dequantize_blocks_int8`: ``cache = q * scale`` in float32, then rounded."""
    keep, ids = _kept(block_ids, k_caches[0].shape[0])
    for layer, kind, cache in _ranges(k_caches, v_caches):
        x = q[keep, layer, kind].float() * _per_head(scales[keep, layer, kind], layout)
        words(cache)[ids] = words(x.to(cache.dtype))
