"""Kernels for paged KV data movement (installed as `kvmem.kernels`).

    write_kv(key, value, cache.k[l], cache.v[l], slot_mapping)       # new tokens into their slots
    buf = gather_blocks(cache.k, cache.v, ids)                       # blocks of every layer -> one buffer
    scatter_blocks(buf, cache.k, cache.v, ids)                       # and back (offload, export, restore)
    move_blocks(cache.k, cache.v, src_ids, dst_ids)                  # compaction, one launch for all layers
    q, scales = quantize_blocks_int8(cache.k, cache.v, ids)          # compressed host tier
    dequantize_blocks_int8(q, scales, cache.k, cache.v, ids)

Design note
-----------
Each operation validates its arguments here (a one-line ValueError naming the argument), then
runs one of two implementations with the same contract: the Triton kernels of
`kvmem.kernels.triton_kernels`, or the torch code of `kvmem.kernels.reference`. `backend=None`
picks Triton for CUDA tensors, and for CPU tensors when the Triton interpreter is on
(TRITON_INTERPRET, read at each call), else torch; `backend_for` says which. The Triton module is
imported on the first Triton launch only (`triton.jit` reads TRITON_INTERPRET when the kernels
are defined), so importing `kvmem.kernels` costs no Triton import, and the variable may be set
any time before the first launch.

Caches are per-layer tensors as `ElasticKVCache` makes them: ``[blocks, block_size, heads, dim]``
("NHD") or ``[blocks, heads, block_size, dim]`` ("HND"), one block contiguous in memory; blocks
may be further apart than their size. Multi-layer operations take the K and V tensors of every
layer, of one shape, dtype and stride, on one device, and reach them in one launch through a
table of every layer's offset from the first (so any per-layer allocations work, not only kvmem's
equally spaced ranges; the table is cached by content). Their buffers are
``[len(ids), layers, 2, *block_shape]`` (index 0 of the third axis is K, 1 is V), contiguous,
block-major so that one block of every layer is one contiguous piece (what an export or a host
tier keeps per block).

Block and slot ids are read on the host to check their range (and, where a kernel writes
through them, that they are distinct): on CUDA tensors that synchronizes. `validate=False` skips
those checks for a hot path; the kernels then skip ids that are out of range instead, and
duplicate destination ids leave it unspecified which write lands.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from types import ModuleType

import torch

from kvmem.common.layout import LAYOUTS
from kvmem.kernels import reference

__all__ = [
    "backend_for",
    "dequantize_blocks_int8",
    "gather_blocks",
    "interpreter_enabled",
    "move_blocks",
    "quantize_blocks_int8",
    "scatter_blocks",
    "write_kv",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CACHE_DTYPES = (*FLOAT_DTYPES, torch.float8_e4m3fn, torch.int8)  # what write_kv can store into
SCALED_DTYPES = (torch.float8_e4m3fn, torch.int8)
COPY_DTYPES = (*FLOAT_DTYPES, torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
INDEX_DTYPES = (torch.int32, torch.int64)
BACKENDS = ("triton", "torch")
# Values Triton takes as true for TRITON_INTERPRET (triton 3.9 reads it with libtriton's
# getenv_bool; checked: "1", "true", "on", "yes", "y" in any case are true, "0", "2", "" are not).
_TRUE = ("1", "true", "on", "yes", "y")


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for the Triton interpreter (read now, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def backend_for(tensor: torch.Tensor) -> str:
    """The backend ``backend=None`` picks for `tensor`: "triton" or "torch"."""
    return "triton" if tensor.is_cuda or interpreter_enabled() else "torch"


def _implementation(backend: str | None, tensor: torch.Tensor) -> ModuleType:
    if backend is None:
        backend = backend_for(tensor)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)} (or None to choose)")
    if backend == "torch":
        return reference
    if not tensor.is_cuda and not interpreter_enabled():
        raise ValueError(
            "backend='triton' on CPU tensors needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 before the first launch"
        )
    from kvmem.kernels import triton_kernels

    if not tensor.is_cuda and not triton_kernels.INTERPRETED:
        raise ValueError(
            "kvmem's Triton kernels were built for the GPU (TRITON_INTERPRET was unset at the first launch): "
            "set TRITON_INTERPRET=1 before the first launch to run them on CPU tensors"
        )
    return triton_kernels


# ---- argument checks ----


def _tensor(name: str, value: object, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, not {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(value.shape)}")
    return value


def _same_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, the caches on {device}: move it to {device}")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")


def _check_cache_pair(names: tuple[str, str], first: torch.Tensor, other: torch.Tensor) -> None:
    for what, a, b in (
        ("shape", tuple(first.shape), tuple(other.shape)),
        ("dtype", first.dtype, other.dtype),
        ("strides", first.stride(), other.stride()),
        ("device", first.device, other.device),
    ):
        if a != b:
            raise ValueError(f"{names[1]} has {what} {b} but {names[0]} has {a}: every K and V cache must match")


def _check_caches(k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The ranges K0, V0, K1, V1, ... after checking they are alike and each block is contiguous."""
    if isinstance(k_caches, torch.Tensor) or isinstance(v_caches, torch.Tensor):
        raise ValueError("k_caches and v_caches must be sequences of per-layer tensors (e.g. cache.k, cache.v)")
    if len(k_caches) == 0 or len(k_caches) != len(v_caches):
        raise ValueError(f"k_caches has {len(k_caches)} layers and v_caches {len(v_caches)}: give both, one per layer")
    first = _tensor("k_caches[0]", k_caches[0], 4)
    ranges = []
    for layer, (k, v) in enumerate(zip(k_caches, v_caches, strict=True)):
        for name, cache in ((f"k_caches[{layer}]", k), (f"v_caches[{layer}]", v)):
            _tensor(name, cache, 4)
            _check_cache_pair(("k_caches[0]", name), first, cache)
            ranges.append(cache)
    if first.dtype not in COPY_DTYPES:
        raise ValueError(f"cache dtype {first.dtype} is not supported: use one of {_names(COPY_DTYPES)}")
    _, a, b, d = first.shape
    if first.stride()[1:] != (b * d, d, 1) or first.stride(0) < a * b * d:
        raise ValueError(
            f"caches with strides {first.stride()} and shape {tuple(first.shape)}: each block must be contiguous "
            "(strides (>= block numel, b*d, d, 1))"
        )
    return ranges


def _check_ids(
    name: str, ids: object, device: torch.device, num_blocks: int, validate: bool, distinct: bool
) -> torch.Tensor:
    ids = _tensor(name, ids, 1)
    if ids.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} has dtype {ids.dtype}: use torch.int64 or torch.int32")
    _same_device(name, ids, device)
    if validate and ids.numel():
        bad = ((ids < 0) | (ids >= num_blocks)).nonzero()
        if bad.numel():
            index = int(bad[0])
            raise ValueError(f"{name}[{index}]={int(ids[index])} is out of range: blocks are 0..{num_blocks - 1}")
        if distinct:
            _check_distinct(name, ids, "block")
    return ids.contiguous()


def _check_distinct(name: str, ids: torch.Tensor, what: str) -> None:
    values, counts = torch.unique(ids, return_counts=True)
    repeated = (counts > 1).nonzero()
    if repeated.numel():
        value = int(values[int(repeated[0])])
        raise ValueError(f"{name} names {what} {value} more than once: each must be written once")


def _check_buffer(name: str, buffer: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    buffer = _tensor(name, buffer, len(shape))
    if tuple(buffer.shape) != shape or buffer.dtype != dtype:
        raise ValueError(f"{name} is {tuple(buffer.shape)} {buffer.dtype}: it must be {shape} {dtype}")
    _same_device(name, buffer, device)
    if not buffer.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return buffer


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


@functools.lru_cache(maxsize=64)
def _offset_table(offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An int64 tensor of `offsets` on `device`, made once per distinct content (so always valid)."""
    return torch.tensor(offsets, dtype=torch.int64, device=device)


def _layer_offsets(ranges: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(element offset of every range from the first, as a device table; the largest power of
    two, at most 16, dividing all of them)."""
    itemsize = ranges[0].element_size()
    base = ranges[0].data_ptr()
    offsets = []
    for index, cache in enumerate(ranges):
        delta = cache.data_ptr() - base
        if delta % itemsize:
            raise ValueError(f"range {index} is not aligned to its element size ({itemsize} bytes) relative to range 0")
        offsets.append(delta // itemsize)
    align = 16
    while align > 1 and any(offset % align for offset in offsets):
        align //= 2
    return _offset_table(tuple(offsets), ranges[0].device), align


def _block_shape(cache: torch.Tensor) -> tuple[int, int, int]:
    return tuple(cache.shape[1:])


# ---- operations ----


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    layout: str = "NHD",
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    validate: bool = True,
    backend: str | None = None,
) -> None:
    """Write new K and V rows into one layer's paged caches: row ``t`` goes to slot ``slot_mapping[t]``.

    Slot ``s`` is token ``s % block_size`` of block ``s // block_size``; negative slots are skipped
    (padding). Rows are converted to the cache dtype, rounding to nearest even: float16, bfloat16
    and float32 caches take any float row dtype; float8_e4m3fn caches store ``x / scale`` clamped
    to +-448; int8 caches ``round(x / scale)`` clamped to +-127 (NaN -> 0).

    Args:
        key, value: ``[tokens, kv_heads, head_dim]`` float16/bfloat16/float32, last dim contiguous.
        key_cache, value_cache: One layer's caches (layout `layout`), last dim contiguous.
        slot_mapping: ``[tokens]`` int64 or int32 slots, distinct where not negative.
        layout: "NHD" or "HND".
        k_scale, v_scale: float32 scales, one (per tensor) or one per KV head; required for
            float8_e4m3fn and int8 caches, refused for others.
        validate: Check slots on the host (see the module note).
        backend: "triton", "torch" or None (choose by device).

    Raises:
        ValueError: Shapes, dtypes, devices or strides that do not fit; a slot out of range or
            repeated.
    """
    _check_layout(layout)
    key = _tensor("key", key, 3)
    value = _tensor("value", value, 3)
    key_cache = _tensor("key_cache", key_cache, 4)
    value_cache = _tensor("value_cache", value_cache, 4)
    _check_cache_pair(("key_cache", "value_cache"), key_cache, value_cache)
    device = key_cache.device
    if key_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"key_cache has dtype {key_cache.dtype}: write_kv stores into {_names(CACHE_DTYPES)}")
    tokens, heads, dims = key.shape
    for name, rows in (("key", key), ("value", value)):
        _same_device(name, rows, device)
        if rows.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {rows.dtype}: use one of {_names(FLOAT_DTYPES)}")
        if tuple(rows.shape) != (tokens, heads, dims) or rows.dtype != key.dtype:
            raise ValueError(
                f"value is {tuple(value.shape)} {value.dtype}, key {tuple(key.shape)} {key.dtype}: they must match"
            )
        if rows.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (strides {rows.stride()})")
    if key_cache.stride(3) != 1:
        raise ValueError(f"key_cache must be contiguous in its last dimension (strides {key_cache.stride()})")
    cache_heads = key_cache.shape[2] if layout == "NHD" else key_cache.shape[1]
    if (cache_heads, key_cache.shape[3]) != (heads, dims):
        raise ValueError(
            f"key is {tuple(key.shape)} but the {layout} cache {tuple(key_cache.shape)} holds {cache_heads} heads "
            f"of dim {key_cache.shape[3]}: check the layout and the geometry"
        )
    slot_mapping = _tensor("slot_mapping", slot_mapping, 1)
    if slot_mapping.dtype not in INDEX_DTYPES:
        raise ValueError(f"slot_mapping has dtype {slot_mapping.dtype}: use torch.int64 or torch.int32")
    if slot_mapping.numel() != tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.numel()} slots for {tokens} tokens: give one per token")
    _same_device("slot_mapping", slot_mapping, device)
    scaled = key_cache.dtype in SCALED_DTYPES
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not scaled:
            if scale is not None:
                raise ValueError(f"{name} is given but a {key_cache.dtype} cache takes no scale: drop it")
            continue
        if scale is None:
            raise ValueError(f"{name} is required for a {key_cache.dtype} cache: one float32 scale, or one per head")
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() not in (1, heads):
            raise ValueError(f"{name} must be a float32 tensor of 1 or {heads} (kv_heads) values")
        _same_device(name, scale, device)
    if scaled:
        k_scale, v_scale = k_scale.reshape(-1).contiguous(), v_scale.reshape(-1).contiguous()
    block_size = key_cache.shape[1] if layout == "NHD" else key_cache.shape[2]
    num_slots = key_cache.shape[0] * block_size
    if validate and tokens:
        bad = (slot_mapping >= num_slots).nonzero()
        if bad.numel():
            index = int(bad[0])
            raise ValueError(
                f"slot_mapping[{index}]={int(slot_mapping[index])} is out of range: the cache has {num_slots} slots"
            )
        written = slot_mapping[slot_mapping >= 0]
        _check_distinct("slot_mapping", written, "slot")
    if tokens == 0:
        return
    _implementation(backend, key_cache).write_kv(
        key, value, key_cache, value_cache, slot_mapping.contiguous(), layout, k_scale, v_scale
    )


def gather_blocks(
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    validate: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Copy blocks of every layer's K and V into one buffer: ``out[i, l, 0] = k_caches[l][block_ids[i]]``.

    Args:
        k_caches, v_caches: Every layer's caches (e.g. ``cache.k``, ``cache.v``).
        block_ids: ``[n]`` int64/int32 block ids (repeats allowed).
        out: ``[n, layers, 2, *block_shape]`` of the caches' dtype, contiguous, on their device;
            made when None.
        validate: Check ids on the host (see the module note).
        backend: "triton", "torch" or None (choose by device).

    Returns:
        `out`.

    Raises:
        ValueError: Caches that differ or whose blocks are not contiguous; a bad `out`; an id out
            of range.
    """
    ranges = _check_caches(k_caches, v_caches)
    first = ranges[0]
    ids = _check_ids("block_ids", block_ids, first.device, first.shape[0], validate, distinct=False)
    shape = (ids.numel(), len(k_caches), 2, *_block_shape(first))
    if out is None:
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
    else:
        out = _check_buffer("out", out, shape, first.dtype, first.device)
    if ids.numel():
        _copy(_implementation(backend, first), "gather", k_caches, v_caches, ranges, ids, None, out)
    return out


def scatter_blocks(
    buffer: torch.Tensor,
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    *,
    validate: bool = True,
    backend: str | None = None,
) -> None:
    """Copy a buffer back into blocks of every layer: ``k_caches[l][block_ids[i]] = buffer[i, l, 0]``.

    Args:
        buffer: ``[n, layers, 2, *block_shape]`` as `gather_blocks` makes it.
        k_caches, v_caches: Every layer's caches.
        block_ids: ``[n]`` distinct int64/int32 block ids.
        validate: Check ids on the host (see the module note).
        backend: "triton", "torch" or None (choose by device).

    Raises:
        ValueError: As `gather_blocks`, and for repeated ids.
    """
    ranges = _check_caches(k_caches, v_caches)
    first = ranges[0]
    ids = _check_ids("block_ids", block_ids, first.device, first.shape[0], validate, distinct=True)
    shape = (ids.numel(), len(k_caches), 2, *_block_shape(first))
    buffer = _check_buffer("buffer", buffer, shape, first.dtype, first.device)
    if ids.numel():
        _copy(_implementation(backend, first), "scatter", k_caches, v_caches, ranges, ids, None, buffer)


def move_blocks(
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
    *,
    validate: bool = True,
    backend: str | None = None,
) -> None:
    """Copy block ``src_ids[i]`` to block ``dst_ids[i]`` in every layer's K and V, in one launch.

    Args:
        k_caches, v_caches: Every layer's caches.
        src_ids, dst_ids: ``[n]`` int64/int32 block ids; destinations distinct and none of them a
            source (the copies run in parallel).
        validate: Check ids on the host (see the module note).
        backend: "triton", "torch" or None (choose by device).

    Raises:
        ValueError: As `gather_blocks`; ids of different lengths, repeated destinations, or a
            destination that is also a source.
    """
    ranges = _check_caches(k_caches, v_caches)
    first = ranges[0]
    src = _check_ids("src_ids", src_ids, first.device, first.shape[0], validate, distinct=False)
    dst = _check_ids("dst_ids", dst_ids, first.device, first.shape[0], validate, distinct=True)
    if src.numel() != dst.numel():
        raise ValueError(f"src_ids has {src.numel()} ids and dst_ids {dst.numel()}: give one destination per source")
    if validate and src.numel():
        overlap = torch.isin(dst, src).nonzero()
        if overlap.numel():
            index = int(overlap[0])
            raise ValueError(f"dst_ids[{index}]={int(dst[index])} is also a source: move it in a second call")
    if src.numel():
        _copy(_implementation(backend, first), "move", k_caches, v_caches, ranges, src, dst, None)


def _copy(
    impl: ModuleType,
    mode: str,
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    ranges: list[torch.Tensor],
    ids: torch.Tensor,
    dst: torch.Tensor | None,
    buffer: torch.Tensor | None,
) -> None:
    if impl is reference:
        if mode == "gather":
            reference.gather_blocks(k_caches, v_caches, ids, buffer)
        elif mode == "scatter":
            reference.scatter_blocks(buffer, k_caches, v_caches, ids)
        else:
            reference.move_blocks(k_caches, v_caches, ids, dst)
        return
    offsets, align = _layer_offsets(ranges)
    code = {"gather": impl.GATHER, "scatter": impl.SCATTER, "move": impl.MOVE}[mode]
    impl.copy_blocks(code, ranges[0], offsets, align, ids, dst, buffer)


def quantize_blocks_int8(
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    *,
    layout: str = "NHD",
    out: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    validate: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather blocks of every layer as int8 with one float32 scale per block, range and head.

    ``scale = absmax / 127`` over the head's block_size x head_dim values, ``q = round(x /
    scale)`` (nearest even, clamped to +-127; all zeros for an all-zero head, whose scale is 0).
    Dequantizing gives each element back within ``scale / 2`` (plus the cache dtype's rounding).
    Inputs must be finite.

    Args:
        k_caches, v_caches: Every layer's float16/bfloat16/float32 caches.
        block_ids: ``[n]`` int64/int32 block ids.
        layout: "NHD" or "HND" (which axis holds the heads).
        out: ``[n, layers, 2, *block_shape]`` int8, made when None.
        scales: ``[n, layers, 2, kv_heads]`` float32, made when None.
        validate: Check ids on the host (see the module note).
        backend: "triton", "torch" or None (choose by device).

    Returns:
        ``(out, scales)``.

    Raises:
        ValueError: As `gather_blocks`, and for caches that are not float16/bfloat16/float32.
    """
    _check_layout(layout)
    ranges = _check_caches(k_caches, v_caches)
    first = ranges[0]
    if first.dtype not in FLOAT_DTYPES:
        raise ValueError(f"cache dtype {first.dtype}: int8 quantization takes {_names(FLOAT_DTYPES)} caches")
    ids = _check_ids("block_ids", block_ids, first.device, first.shape[0], validate, distinct=False)
    q_shape, scales_shape = _quantized_shapes(ids.numel(), len(k_caches), first, layout)
    if out is None:
        out = torch.empty(q_shape, dtype=torch.int8, device=first.device)
    else:
        out = _check_buffer("out", out, q_shape, torch.int8, first.device)
    if scales is None:
        scales = torch.empty(scales_shape, dtype=torch.float32, device=first.device)
    else:
        scales = _check_buffer("scales", scales, scales_shape, torch.float32, first.device)
    if ids.numel():
        impl = _implementation(backend, first)
        if impl is reference:
            reference.quantize_blocks_int8(k_caches, v_caches, ids, layout, out, scales)
        else:
            offsets, align = _layer_offsets(ranges)
            impl.quantize(False, first, offsets, align, ids, out, scales, layout)
    return out, scales


def dequantize_blocks_int8(
    q: torch.Tensor,
    scales: torch.Tensor,
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    *,
    layout: str = "NHD",
    validate: bool = True,
    backend: str | None = None,
) -> None:
    """Write ``q * scale`` (float32, then rounded to the cache dtype) into blocks of every layer.

    Args:
        q, scales: As `quantize_blocks_int8` returns them.
        k_caches, v_caches: Every layer's float16/bfloat16/float32 caches.
        block_ids: ``[n]`` distinct int64/int32 block ids.
        layout: "NHD" or "HND".
        validate: Check ids on the host (see the module note).
        backend: "triton", "torch" or None (choose by device).

    Raises:
        ValueError: As `quantize_blocks_int8`, and for repeated ids.
    """
    _check_layout(layout)
    ranges = _check_caches(k_caches, v_caches)
    first = ranges[0]
    if first.dtype not in FLOAT_DTYPES:
        raise ValueError(f"cache dtype {first.dtype}: int8 dequantization writes {_names(FLOAT_DTYPES)} caches")
    ids = _check_ids("block_ids", block_ids, first.device, first.shape[0], validate, distinct=True)
    q_shape, scales_shape = _quantized_shapes(ids.numel(), len(k_caches), first, layout)
    q = _check_buffer("q", q, q_shape, torch.int8, first.device)
    scales = _check_buffer("scales", scales, scales_shape, torch.float32, first.device)
    if ids.numel():
        impl = _implementation(backend, first)
        if impl is reference:
            reference.dequantize_blocks_int8(q, scales, k_caches, v_caches, ids, layout)
        else:
            offsets, align = _layer_offsets(ranges)
            impl.quantize(True, first, offsets, align, ids, q, scales, layout)


def _quantized_shapes(n: int, layers: int, cache: torch.Tensor, layout: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    heads = cache.shape[2] if layout == "NHD" else cache.shape[1]
    return (n, layers, 2, *_block_shape(cache)), (n, layers, 2, heads)
