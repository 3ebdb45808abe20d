"""Triton kernels for paged KV data movement, and their launchers.

Design note
-----------
Importing this module defines the kernels, and `triton.jit` decides at that moment whether they
are compiled or interpreted: it reads TRITON_INTERPRET when it decorates (triton 3.9,
``triton/runtime/jit.py``, ``jit()``: ``if knobs.runtime.interpret: ... InterpretedFunction``).
`kvmem.kernels` therefore imports this module only on the first Triton launch, so setting the
variable any time before that launch is enough; `INTERPRETED` records which kind was built.

Storage words. Kernels never load or store a float8 or bfloat16 type. Every cache, row and buffer
is passed as integers of its element width (int16 for float16/bfloat16, int32 for float32, uint8
for float8_e4m3fn, int8 for int8), copies move those words bit for bit, and conversions are done
on float32 with integer arithmetic (`_decode`, `_encode`), rounding to nearest even exactly as
torch does. The reason is the interpreter: it rounds float32 -> bfloat16 toward zero and
float32 -> float8e4nv half-up without carrying a mantissa overflow into the exponent, nor
saturating (triton 3.9, ``triton/runtime/interpreter.py``, ``_convert_float``; measured: 519 of
1024 random values differ from torch for bfloat16, and 31.88 -> 16.0 for float8e4nv). Written in
integers, the interpreted kernel computes what the compiled one computes, and tests on CPU mean
something on a GPU. Divisions are ``tl.math.div_rn`` (IEEE round to nearest, as torch divides),
not `/`, which compiles to the approximate ``div.full.f32`` on NVIDIA GPUs (up to 2 ulp; Triton
PR #446, issue #10661), and not ``tl.fdiv(..., ieee_rounding=True)``, whose flag some Triton
releases ignored (issue #10073); the interpreter divides with numpy, IEEE either way.

Multi-layer kernels take the first range's tensor as a base pointer and an int64 table of every
range's element offset from it, in the order K0, V0, K1, V1, ...: any per-layer tensors work
(kvmem's ranges in one reservation, or separate allocations), at the cost of one table (cached by
`kvmem.kernels`). `ALIGN` tells the compiler the largest power of two (at most 16 elements)
dividing every offset, so that loads can be vectorized.

`tl.arange` sizes must be powers of two: head dims, heads and tokens are padded up and masked.
The interpreter does no bounds checking, so masks are the only thing that keeps a kernel in its
buffers; the tests run in guard-padded buffers. A program whose id is out of range (a skipped
slot or block) masks everything by folding its scalar validity into a bound (``dims <
tl.where(valid, head_dim, 0)``) rather than and-ing it into the mask: in the interpreter, a block
of int1 and-ed with a scalar int1 holds int32 data, which `tl.load` refuses as a mask ("mask has
unsupported dtype"; triton 3.9).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kvmem.kernels.reference import words

# Element kinds (constexpr codes).
F16, BF16, F32, FP8_E4M3, I8 = 0, 1, 2, 3, 4
KINDS = {torch.float16: F16, torch.bfloat16: BF16, torch.float32: F32, torch.float8_e4m3fn: FP8_E4M3, torch.int8: I8}
# Copy kernel modes.
GATHER, SCATTER, MOVE = 0, 1, 2
MAX_TILE = 4096  # elements one copy program moves


@triton.jit
def _decode(word, KIND: tl.constexpr):
    """Storage word of a float16 / bfloat16 / float32 value -> float32 (exact)."""
    if KIND == 0:
        return word.to(tl.float16, bitcast=True).to(tl.float32)
    elif KIND == 1:
        return (word.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return word.to(tl.float32, bitcast=True)


@triton.jit
def _encode(x, KIND: tl.constexpr):
    """float32 -> storage word of KIND, rounding to nearest even (float8 and int8 saturate).

    float8_e4m3fn: |x| clamped to 448; normal results round the float32 bits (the carry
    propagates into the exponent), subnormal ones (|x| < 2**-6, steps of 2**-9) round x * 512 by
    adding 2**23; NaN -> 0x7F with x's sign. int8: clamped to +-127, rounded by adding and
    subtracting 1.5 * 2**23; NaN -> 0. bfloat16: NaN -> 0x7FC0 (rounding its bits could make
    an infinity).
    """
    if KIND == 0:
        return x.to(tl.float16).to(tl.int16, bitcast=True)
    elif KIND == 1:
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(x != x, 0x7FC0, rounded).to(tl.int16)
    elif KIND == 2:
        return x.to(tl.int32, bitcast=True)
    elif KIND == 3:
        sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
        a = tl.minimum(tl.abs(x), 448.0)
        bits = a.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
        subnormal = (a * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
        magnitude = tl.where(a < 0.015625, subnormal, normal)
        magnitude = tl.where(x != x, 0x7F, magnitude)
        return (magnitude | sign).to(tl.uint8)
    else:
        clamped = tl.minimum(tl.maximum(x, -127.0), 127.0)
        rounded = (clamped + 12582912.0) - 12582912.0
        return tl.where(x != x, 0.0, rounded).to(tl.int8)


@triton.jit
def _write_rows(
    src, dst, mask, scale_ptr, heads, num_heads, SCALE_STRIDE: tl.constexpr, SRC: tl.constexpr, DST: tl.constexpr
):
    word = tl.load(src, mask=mask)
    if SRC == DST:
        tl.store(dst, word, mask=mask)
    else:
        x = _decode(word, SRC)
        if DST >= 3:  # float8 / int8: divide by the scale of each head first
            scale = tl.load(scale_ptr + heads * SCALE_STRIDE, mask=heads < num_heads, other=1.0)
            x = tl.math.div_rn(x, scale)
        tl.store(dst, _encode(x, DST), mask=mask)


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    k_scale_ptr,
    v_scale_ptr,
    num_slots,
    num_heads,
    head_dim,
    key_stride_token,
    key_stride_head,
    value_stride_token,
    value_stride_head,
    cache_stride_block,
    cache_stride_token,
    cache_stride_head,
    BLOCK_SIZE: tl.constexpr,
    HEADS: tl.constexpr,
    DIMS: tl.constexpr,
    SRC: tl.constexpr,
    DST: tl.constexpr,
    K_SCALE_STRIDE: tl.constexpr,
    V_SCALE_STRIDE: tl.constexpr,
):
    """One program per token: its K and V rows (all heads) into slot ``slot_mapping[token]``."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    valid = (slot >= 0) & (slot < num_slots)
    heads = tl.arange(0, HEADS)[:, None]
    dims = tl.arange(0, DIMS)[None, :]
    mask = (heads < num_heads) & (dims < tl.where(valid, head_dim, 0))
    dst = (slot // BLOCK_SIZE) * cache_stride_block + (slot % BLOCK_SIZE) * cache_stride_token
    dst += heads * cache_stride_head + dims
    key_src = key_ptr + token * key_stride_token + heads * key_stride_head + dims
    value_src = value_ptr + token * value_stride_token + heads * value_stride_head + dims
    _write_rows(key_src, key_cache_ptr + dst, mask, k_scale_ptr, heads, num_heads, K_SCALE_STRIDE, SRC, DST)
    _write_rows(value_src, value_cache_ptr + dst, mask, v_scale_ptr, heads, num_heads, V_SCALE_STRIDE, SRC, DST)


@triton.jit
def _copy_blocks_kernel(
    cache_ptr,
    offsets_ptr,
    ids_ptr,
    dst_ids_ptr,
    buffer_ptr,
    num_blocks,
    block_stride,
    block_numel,
    num_ranges,
    TILE: tl.constexpr,
    ALIGN: tl.constexpr,
    MODE: tl.constexpr,
):
    """Program (i, range, chunk) copies one tile of block ``ids[i]`` of one range.

    GATHER: cache -> ``buffer[i, range]``; SCATTER: ``buffer[i, range]`` -> cache; MOVE: block
    ``ids[i]`` -> block ``dst_ids[i]`` of the same range. Out-of-range ids are skipped.
    """
    i = tl.program_id(0).to(tl.int64)
    rng = tl.program_id(1)
    inner = tl.program_id(2).to(tl.int64) * TILE + tl.arange(0, TILE)
    base = cache_ptr + tl.multiple_of(tl.load(offsets_ptr + rng), ALIGN)
    block = tl.load(ids_ptr + i).to(tl.int64)
    valid = (block >= 0) & (block < num_blocks)
    cache_at = base + block * block_stride + inner
    buffer_at = buffer_ptr + (i * num_ranges + rng) * block_numel + inner
    if MODE == 2:
        dst_block = tl.load(dst_ids_ptr + i).to(tl.int64)
        valid = valid & (dst_block >= 0) & (dst_block < num_blocks)
    mask = inner < tl.where(valid, block_numel, 0)
    if MODE == 0:
        tl.store(buffer_at, tl.load(cache_at, mask=mask), mask=mask)
    elif MODE == 1:
        tl.store(cache_at, tl.load(buffer_at, mask=mask), mask=mask)
    else:
        tl.store(base + dst_block * block_stride + inner, tl.load(cache_at, mask=mask), mask=mask)


@triton.jit
def _quantize_kernel(
    cache_ptr,
    offsets_ptr,
    ids_ptr,
    q_ptr,
    scales_ptr,
    num_blocks,
    block_stride,
    block_numel,
    num_ranges,
    num_heads,
    block_size,
    head_dim,
    stride_token,
    stride_head,
    TOKENS: tl.constexpr,
    DIMS: tl.constexpr,
    KIND: tl.constexpr,
    ALIGN: tl.constexpr,
    DEQUANTIZE: tl.constexpr,
):
    """Program (i, range, head): one head of block ``ids[i]`` of one range, to or from int8.

    Quantize: ``scale = absmax / 127``, ``q = round(x / scale)``, into ``q[i, range]`` and
    ``scales[i, range, head]``. Dequantize: ``x = q * scale`` back into the cache.
    """
    i = tl.program_id(0).to(tl.int64)
    rng = tl.program_id(1)
    head = tl.program_id(2)
    base = cache_ptr + tl.multiple_of(tl.load(offsets_ptr + rng), ALIGN)
    block = tl.load(ids_ptr + i).to(tl.int64)
    tokens = tl.arange(0, TOKENS)[:, None]
    dims = tl.arange(0, DIMS)[None, :]
    valid = (block >= 0) & (block < num_blocks)
    mask = (tokens < block_size) & (dims < tl.where(valid, head_dim, 0))
    inner = tokens * stride_token + head * stride_head + dims
    cache_at = base + block * block_stride + inner
    row = i * num_ranges + rng
    q_at = q_ptr + row * block_numel + inner
    scale_at = scales_ptr + row * num_heads + head
    if DEQUANTIZE:
        x = tl.load(q_at, mask=mask).to(tl.float32) * tl.load(scale_at, mask=valid)
        tl.store(cache_at, _encode(x, KIND), mask=mask)
    else:
        x = _decode(tl.load(cache_at, mask=mask, other=0), KIND)
        scale = tl.math.div_rn(tl.max(tl.abs(x)), 127.0)
        q = _encode(tl.math.div_rn(x, tl.where(scale > 0, scale, 1.0)), 4)
        tl.store(q_at, q, mask=mask)
        tl.store(scale_at, scale, mask=valid)


INTERPRETED = isinstance(_copy_blocks_kernel, InterpretedFunction)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(n)


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
    """Launch `_write_kv_kernel`; arguments as `kvmem.kernels.write_kv`, already validated."""
    tokens, heads, dims = key.shape
    token_axis, head_axis = (1, 2) if layout == "NHD" else (2, 1)
    block_size = key_cache.shape[token_axis]
    scaled = k_scale is not None
    _write_kv_kernel[(tokens,)](
        words(key),
        words(value),
        words(key_cache),
        words(value_cache),
        slot_mapping,
        k_scale if scaled else key_cache,  # never read unless scaled
        v_scale if scaled else value_cache,
        key_cache.shape[0] * block_size,
        heads,
        dims,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(token_axis),
        key_cache.stride(head_axis),
        BLOCK_SIZE=block_size,
        HEADS=_pow2(heads),
        DIMS=_pow2(dims),
        SRC=KINDS[key.dtype],
        DST=KINDS[key_cache.dtype],
        K_SCALE_STRIDE=int(scaled and k_scale.numel() > 1),
        V_SCALE_STRIDE=int(scaled and v_scale.numel() > 1),
    )


def copy_blocks(
    mode: int,
    base: torch.Tensor,
    offsets: torch.Tensor,
    align: int,
    ids: torch.Tensor,
    dst_ids: torch.Tensor | None,
    buffer: torch.Tensor | None,
) -> None:
    """Launch `_copy_blocks_kernel` over ``len(ids)`` blocks of ``len(offsets)`` ranges.

    `base` is the first range's cache tensor, `offsets` the element offset of every range from
    it; `buffer` is ``[len(ids), ranges, *block_shape]`` (GATHER, SCATTER), `dst_ids` (MOVE).
    """
    block_numel = base[0].numel()
    tile = min(MAX_TILE, _pow2(block_numel))
    grid = (ids.numel(), offsets.numel(), triton.cdiv(block_numel, tile))
    _copy_blocks_kernel[grid](
        words(base),
        offsets,
        ids,
        ids if dst_ids is None else dst_ids,
        words(base) if buffer is None else words(buffer),
        base.shape[0],
        base.stride(0),
        block_numel,
        offsets.numel(),
        TILE=tile,
        ALIGN=align,
        MODE=mode,
    )


def quantize(
    dequantize: bool,
    base: torch.Tensor,
    offsets: torch.Tensor,
    align: int,
    ids: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    layout: str,
) -> None:
    """Launch `_quantize_kernel` (to int8, or back when `dequantize`); `q` and `scales` as
    `kvmem.kernels.quantize_blocks_int8` makes them."""
    token_axis, head_axis = (1, 2) if layout == "NHD" else (2, 1)
    heads, block_size, dims = base.shape[head_axis], base.shape[token_axis], base.shape[3]
    _quantize_kernel[(ids.numel(), offsets.numel(), heads)](
        words(base),
        offsets,
        ids,
        q,
        scales,
        base.shape[0],
        base.stride(0),
        base[0].numel(),
        offsets.numel(),
        heads,
        block_size,
        dims,
        base.stride(token_axis),
        base.stride(head_axis),
        TOKENS=_pow2(block_size),
        DIMS=_pow2(dims),
        KIND=KINDS[base.dtype],
        ALIGN=align,
        DEQUANTIZE=dequantize,
    )
