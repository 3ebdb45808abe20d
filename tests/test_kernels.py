"""kvmem.kernels: every Triton kernel, run by Triton's interpreter on CPU, against its torch reference.

TRITON_INTERPRET is set at the top of this module, before any kernel launch: `kvmem.kernels`
reads it at each call and imports its Triton module (where `triton.jit` reads it) on the first
Triton launch, so this works when the whole suite runs in one process, whatever was imported
before. `test_the_triton_interpreter_runs_the_kernels` checks that it really is the interpreter.

Each kernel runs in guard-padded buffers (the interpreter does no bounds checking): random
values around every cache and buffer, and between blocks where blocks are further apart than
their size. Targets are poisoned (NaN, or a byte no kernel writes) first. The kernel runs on one
copy and the reference on a twin, and the whole storage, guards included, must then be equal
bit for bit: so every target was written with the reference's value and nothing else changed.
"""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys
from dataclasses import dataclass

os.environ["TRITON_INTERPRET"] = "1"  # before the first kernel launch (see the module docstring)

import pytest
import torch

import kvmem
import kvmem.kernels as K
from kvmem.kernels import reference
from kvmem.kernels.reference import words
from tests.support import REPO, real_driver_env

HEAD_DIMS = (64, 80, 96, 112, 120, 128)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
GUARD = 64  # elements of random guard before and after every storage
POISON = {  # a word no kernel writes for finite inputs: NaN, or -128 for int8 (q is clamped to +-127)
    torch.float16: 0x7E00,
    torch.bfloat16: 0x7FC0,
    torch.float32: 0x7FC00000,
    torch.float8_e4m3fn: 0x7F,
    torch.float8_e5m2: 0x7F,
    torch.int8: 0x80,
}


def rand(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, scale: float = 8.0) -> torch.Tensor:
    """Random finite values, never zero: magnitude in [scale/32, scale], random sign."""
    magnitude = scale / 32 + (scale - scale / 32) * torch.rand(shape, generator=gen)
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    values = magnitude * sign
    if dtype == torch.int8:
        return values.clamp(-127, 127).round().to(torch.int8)
    return values.to(dtype)


def poison(tensor: torch.Tensor) -> None:
    words(tensor).fill_(POISON[tensor.dtype] - (256 if tensor.dtype == torch.int8 else 0))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(words(a), words(b))


@dataclass
class Caches:
    """Per-layer K and V caches as views of guard-padded storages.

    `shared`: all ranges in one storage, equally spaced with a gap between them (as kvmem lays
    them out); else each range in its own storage. `gap`: elements between consecutive blocks.
    """

    storages: list[torch.Tensor]
    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def make(
        cls,
        layers: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        gen: torch.Generator,
        gap: int = 0,
        shared: bool = False,
    ) -> Caches:
        blocks, block_numel = shape[0], math.prod(shape[1:])
        range_numel = blocks * (block_numel + gap) + GUARD
        count = 1 if shared else 2 * layers
        per_storage = (2 * layers if shared else 1) * range_numel
        storages = [rand((GUARD + per_storage,), dtype, gen) for _ in range(count)]
        ranges = []
        for r in range(2 * layers):
            storage = storages[0] if shared else storages[r]
            start = GUARD + (r * range_numel if shared else 0)
            ranges.append(storage.as_strided(shape, (block_numel + gap, *_inner_strides(shape)), start))
        return cls(storages, ranges[0::2], ranges[1::2])

    def twin(self) -> Caches:
        """A copy with the same storages' contents and the same views into them."""
        storages = [s.clone() for s in self.storages]
        index = {s.untyped_storage().data_ptr(): i for i, s in enumerate(self.storages)}

        def again(view: torch.Tensor) -> torch.Tensor:
            owner = storages[index[view.untyped_storage().data_ptr()]]
            return owner.as_strided(view.shape, view.stride(), view.storage_offset())

        return Caches(storages, [again(t) for t in self.k], [again(t) for t in self.v])

    def assert_same(self, other: Caches) -> None:
        for i, (a, b) in enumerate(zip(self.storages, other.storages, strict=True)):
            assert same_bits(a, b), f"storage {i} differs from the reference's"


def _inner_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[2] * shape[3], shape[3], 1)


def guarded(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(storage, a contiguous view of `shape` inside it, between random guards)."""
    storage = rand((2 * GUARD + math.prod(shape),), dtype, gen)
    return storage, storage[GUARD : GUARD + math.prod(shape)].view(shape)


def twin_buffer(storage: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    copy = storage.clone()
    return copy, copy.as_strided(view.shape, view.stride(), view.storage_offset())


def cache_shape(blocks: int, block_size: int, heads: int, dim: int, layout: str) -> tuple[int, int, int, int]:
    return (blocks, block_size, heads, dim) if layout == "NHD" else (blocks, heads, block_size, dim)


# ---- the interpreter really runs ----


def test_the_triton_interpreter_runs_the_kernels():
    from triton.runtime.interpreter import InterpretedFunction

    gen = torch.Generator().manual_seed(1)
    caches = Caches.make(1, (4, 16, 2, 64), torch.float16, gen)
    assert K.interpreter_enabled() and K.backend_for(caches.k[0]) == "triton"
    expected = caches.twin()
    out = K.gather_blocks(caches.k, caches.v, torch.tensor([3, 0]))  # backend chosen by the dispatcher
    from kvmem.kernels import triton_kernels

    assert triton_kernels.INTERPRETED
    for kernel in (
        triton_kernels._write_kv_kernel,
        triton_kernels._copy_blocks_kernel,
        triton_kernels._quantize_kernel,
    ):
        assert isinstance(kernel, InterpretedFunction)
    assert same_bits(out, reference_gather(expected, torch.tensor([3, 0])))


def reference_gather(caches: Caches, ids: torch.Tensor) -> torch.Tensor:
    out = torch.empty((ids.numel(), len(caches.k), 2, *caches.k[0].shape[1:]), dtype=caches.k[0].dtype)
    reference.gather_blocks(caches.k, caches.v, ids, out)
    return out


def test_without_the_interpreter_cpu_tensors_take_the_torch_path(monkeypatch: pytest.MonkeyPatch):
    gen = torch.Generator().manual_seed(2)
    caches = Caches.make(1, (4, 16, 2, 64), torch.float16, gen)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not K.interpreter_enabled() and K.backend_for(caches.k[0]) == "torch"
    out = K.gather_blocks(caches.k, caches.v, torch.tensor([1]))
    assert same_bits(out[0, 0, 1], caches.v[0][1])
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1 before the first launch"):
        K.gather_blocks(caches.k, caches.v, torch.tensor([1]), backend="triton")


# ---- write_kv ----

WRITE_CASES = [
    (FLOATS[(i + j) % 3], dst, dim, ("NHD", "HND")[(i + j) % 2], (16, 32)[(i // 2 + j) % 2])
    for j, dst in enumerate((*FLOATS, torch.float8_e4m3fn, torch.int8))
    for i, dim in enumerate(HEAD_DIMS)
]


def _write_case(src, dst, dim, layout, block_size, gen, per_head):
    heads, blocks, tokens = 3, 3, 7
    caches = Caches.make(1, cache_shape(blocks, block_size, heads, dim, layout), dst, gen, gap=dim + 3)
    inside = 1 + torch.randperm(blocks * block_size - 2, generator=gen)[: tokens - 3]
    # Both ends of the cache (masked lanes past the last slot would hit the guard), and a skipped row.
    slots = torch.cat([torch.tensor([blocks * block_size - 1, 0, -1]), inside])
    key = rand((tokens, heads, dim), src, gen, scale=40.0)
    value = rand((tokens, heads, dim), src, gen, scale=40.0)
    scales = {}
    if dst in (torch.float8_e4m3fn, torch.int8):
        scales = {
            "k_scale": 0.05 + torch.rand(heads if per_head else 1, generator=gen),
            "v_scale": 0.05 + torch.rand(1 if per_head else heads, generator=gen),
        }
    for cache in (caches.k[0], caches.v[0]):
        for slot in slots[slots >= 0].tolist():
            block, offset = divmod(slot, block_size)
            poison(cache[block, offset] if layout == "NHD" else cache[block, :, offset])
    return caches, slots, key, value, scales


@pytest.mark.parametrize(("src", "dst", "dim", "layout", "block_size"), WRITE_CASES)
def test_write_kv_matches_the_reference(src, dst, dim, layout, block_size):
    gen = torch.Generator().manual_seed(dim * 7 + block_size + FLOATS.index(src))
    caches, slots, key, value, scales = _write_case(src, dst, dim, layout, block_size, gen, per_head=dim % 32 == 0)
    expected = caches.twin()
    K.write_kv(key, value, caches.k[0], caches.v[0], slots, layout=layout, **scales, backend="triton")
    reference.write_kv(
        key, value, expected.k[0], expected.v[0], slots, layout, scales.get("k_scale"), scales.get("v_scale")
    )
    caches.assert_same(expected)


def test_write_kv_takes_strided_rows_and_int32_slots():
    """Rows that are a slice of a fused QKV projection (token stride > heads * dim)."""
    gen = torch.Generator().manual_seed(3)
    caches = Caches.make(1, (2, 16, 2, 80), torch.bfloat16, gen)
    qkv = rand((5, 6, 80), torch.bfloat16, gen)
    key, value = qkv[:, 2:4], qkv[:, 4:6]
    slots = torch.tensor([31, 0, 17, -5, 8], dtype=torch.int32)
    expected = caches.twin()
    K.write_kv(key, value, caches.k[0], caches.v[0], slots, backend="triton")
    reference.write_kv(key, value, expected.k[0], expected.v[0], slots, "NHD", None, None)
    caches.assert_same(expected)
    assert same_bits(caches.v[0][1, 1], value[2]) and same_bits(caches.k[0][0, 0], key[1])


def _convert_through_write_kv(values: torch.Tensor, dst: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Write `values` (float32) as rows of 8 heads x 128 into a `dst` cache; return the cache's
    words in the values' order, after checking them against the reference's: bit for bit, except
    that a NaN stored in a float cache need only be a NaN (torch's own bits for it vary: this CPU
    build's vectorized float32 -> bfloat16 gives 0xFFFF, its scalar code 0x7FC0)."""
    rows = values.reshape(-1, 8, 128)
    tokens, n = rows.shape[0], values.numel()
    blocks = -(-tokens // 16)
    caches = [torch.zeros((blocks, 16, 8, 128), dtype=dst) for _ in range(4)]
    slots = torch.arange(tokens)
    scales = {}
    if dst in (torch.float8_e4m3fn, torch.int8):
        scales = {"k_scale": torch.tensor([scale]), "v_scale": torch.tensor([scale])}
    K.write_kv(rows, rows, caches[0], caches[1], slots, **scales, backend="triton")
    reference.write_kv(rows, rows, caches[2], caches[3], slots, "NHD", scales.get("k_scale"), scales.get("v_scale"))
    nan = values.isnan() if dst in FLOATS else torch.zeros(n, dtype=torch.bool)
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(words(got).flatten()[:n][~nan], words(want).flatten()[:n][~nan])
        assert bool(got.flatten()[:n][nan].isnan().all())
    return words(caches[0]).flatten()[:n]


def test_float8_conversion_of_every_float16_value_matches_torch():
    """All 63,488 finite float16 values (as float32), at two scales: round to nearest even,
    subnormals, saturation at 448, signed zeros."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.float16)
    values = values[torch.isfinite(values)].float()
    assert values.numel() == 63488
    for scale in (1.0, 0.37):
        _convert_through_write_kv(values, torch.float8_e4m3fn, scale)


def test_float8_int8_and_bfloat16_conversions_of_chosen_values():
    ties_and_edges = [
        31.88,  # rounds up into the next binade: 32 (the interpreter's own cast gives 16)
        500.0,  # saturates to 448
        -500.0,
        1.0625,  # halfway between 1 and 1.125: to even, 1
        1.1875,  # halfway between 1.125 and 1.25: to even, 1.25
        2.0**-9,  # smallest subnormal
        1.5 * 2.0**-9,  # halfway between 1 and 2 subnormal steps: to even, 2
        0.5 * 2.0**-9,  # halfway between 0 and the smallest subnormal: to even, 0
        2.0**-6 - 2.0**-11,  # rounds up to the smallest normal
        -0.0,
        float("nan"),
    ]
    values = torch.tensor(ties_and_edges + [0.0] * (1024 - len(ties_and_edges)))
    fp8 = _convert_through_write_kv(values, torch.float8_e4m3fn)
    assert fp8[:10].tolist() == [0x60, 0x7E, 0xFE, 0x38, 0x3A, 0x01, 0x02, 0x00, 0x08, 0x80]
    assert fp8[10] & 0x7F == 0x7F  # NaN

    int8 = [2.5, 3.5, -2.5, 126.5, 127.4, 200.0, -300.0, float("inf"), float("-inf"), float("nan"), 0.49, -0.51]
    q = _convert_through_write_kv(torch.tensor(int8 + [0.0] * (1024 - len(int8))), torch.int8)
    assert q[: len(int8)].view(torch.int8).tolist() == [2, 4, -2, 126, 127, 127, -127, 127, -127, 0, 0, -1]

    bf16 = [1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8 + 2.0**-20), 3.0e38, float("nan"), 2.0**-130]
    b = _convert_through_write_kv(torch.tensor(bf16 + [0.0] * (1024 - len(bf16))), torch.bfloat16)
    assert (b[: len(bf16)].view(torch.int16).to(torch.int32) & 0xFFFF).tolist() == [
        0x3F80,  # tie: to even
        0x3F82,  # tie: to even (up)
        0xBF81,  # above the tie: away from zero
        0x7F62,  # large finite stays finite
        0x7FC0,  # NaN: a quiet NaN
        0x0008,  # subnormal (2**-130)
    ]


# float16's overflow to infinity is part of what is checked; numpy (the interpreter) warns of it.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_bfloat16_and_float16_conversions_of_random_float32_bit_patterns():
    gen = torch.Generator().manual_seed(4)
    patterns = torch.randint(-(2**31), 2**31 - 1, (4 * 1024,), generator=gen, dtype=torch.int64).to(torch.int32)
    values = patterns.view(torch.float32)
    _convert_through_write_kv(values, torch.bfloat16)
    # float16's range: normals, subnormals, underflow to zero and overflow to infinity.
    exponents = torch.randint(-30, 18, (4 * 1024,), generator=gen).float()
    _convert_through_write_kv(torch.randn(4 * 1024, generator=gen) * 2.0**exponents, torch.float16)


# ---- gather / scatter / move ----

COPY_CASES = [
    (dtype, dim, ("NHD", "HND")[i % 2], (16, 32)[(i // 2) % 2], i % 3 == 0, (0, 40)[i % 2])
    for i, (dim, dtype) in enumerate(
        zip(
            HEAD_DIMS,
            (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.int8, torch.float8_e5m2),
            strict=True,
        )
    )
]


@pytest.mark.parametrize(("dtype", "dim", "layout", "block_size", "shared", "gap"), COPY_CASES)
def test_gather_scatter_and_move_match_the_reference(dtype, dim, layout, block_size, shared, gap):
    gen = torch.Generator().manual_seed(dim + block_size)
    layers, blocks = 2, 6
    caches = Caches.make(layers, cache_shape(blocks, block_size, 2, dim, layout), dtype, gen, gap=gap, shared=shared)
    shape = (3, layers, 2, *caches.k[0].shape[1:])

    # gather: a poisoned buffer between guards; the last block and a repeat are included.
    ids = torch.tensor([5, 0, 5])
    storage, out = guarded(shape, dtype, gen)
    poison(out)
    expected_storage, expected_out = twin_buffer(storage, out)
    before = caches.twin()
    assert K.gather_blocks(caches.k, caches.v, ids, out, backend="triton") is out
    reference.gather_blocks(before.k, before.v, ids, expected_out)
    assert same_bits(storage, expected_storage)
    caches.assert_same(before)  # reading changed nothing
    assert same_bits(out[1, 1, 1], caches.v[1][0])

    # scatter: the buffer into other blocks (poisoned first), the last one included.
    dst = torch.tensor([4, 1, 5])
    source_storage, source = guarded(shape, dtype, gen)
    source_before = source_storage.clone()
    for cache in caches.k + caches.v:
        poison(cache[dst])
    expected = caches.twin()
    K.scatter_blocks(source, caches.k, caches.v, dst, backend="triton")
    reference.scatter_blocks(source, expected.k, expected.v, dst)
    caches.assert_same(expected)
    assert same_bits(source_storage, source_before)
    assert same_bits(caches.k[0][1], source[1, 0, 0])

    # move: blocks 0 and 2 of every layer to blocks 3 and 5 (poisoned first).
    src, dst = torch.tensor([0, 2]), torch.tensor([5, 3])
    for cache in caches.k + caches.v:
        poison(cache[dst])
    expected = caches.twin()
    K.move_blocks(caches.k, caches.v, src, dst, backend="triton")
    reference.move_blocks(expected.k, expected.v, src, dst)
    caches.assert_same(expected)
    assert same_bits(caches.v[1][3], caches.v[1][2])


def test_blocks_larger_than_one_tile_are_copied_whole():
    """8,192-element blocks: two copy programs per block and range."""
    gen = torch.Generator().manual_seed(5)
    caches = Caches.make(1, (3, 32, 2, 128), torch.float16, gen, gap=5)
    out = K.gather_blocks(caches.k, caches.v, torch.tensor([2, 1]), backend="triton")
    assert same_bits(out, reference_gather(caches, torch.tensor([2, 1])))


def test_with_validation_off_out_of_range_ids_and_slots_are_skipped():
    gen = torch.Generator().manual_seed(6)
    caches = Caches.make(2, (4, 16, 2, 80), torch.float16, gen)
    ids = torch.tensor([1, 99, -1, 3])
    storage, out = guarded((4, 2, 2, 16, 2, 80), torch.float16, gen)
    poison(out)
    K.gather_blocks(caches.k, caches.v, ids, out, validate=False, backend="triton")
    assert same_bits(out[0, 1, 0], caches.k[1][1]) and same_bits(out[3, 0, 1], caches.v[0][3])
    assert bool(out[1:3].isnan().all())  # skipped: still poison
    expected_storage, expected_out = twin_buffer(storage, out)
    reference.gather_blocks(caches.k, caches.v, ids, expected_out)
    assert same_bits(storage, expected_storage)

    expected = caches.twin()
    K.move_blocks(
        caches.k, caches.v, torch.tensor([0, 1, 2]), torch.tensor([3, 4, -2]), validate=False, backend="triton"
    )
    reference.move_blocks(expected.k, expected.v, torch.tensor([0, 1, 2]), torch.tensor([3, 4, -2]))
    caches.assert_same(expected)
    assert same_bits(caches.k[1][3], caches.k[1][0])

    key, value = rand((3, 2, 80), torch.float16, gen), rand((3, 2, 80), torch.float16, gen)
    expected = caches.twin()
    slots = torch.tensor([64, 2, 1000])  # 4 blocks of 16: slots 0..63
    K.write_kv(key, value, caches.k[0], caches.v[0], slots, validate=False, backend="triton")
    reference.write_kv(key, value, expected.k[0], expected.v[0], slots, "NHD", None, None)
    caches.assert_same(expected)
    assert same_bits(caches.k[0][0, 2], key[1])


# ---- int8 quantization ----

QUANT_CASES = [(FLOATS[i % 3], dim, ("NHD", "HND")[(i // 3) % 2], (16, 32)[i % 2]) for i, dim in enumerate(HEAD_DIMS)]


@pytest.mark.parametrize(("dtype", "dim", "layout", "block_size"), QUANT_CASES)
def test_quantize_and_dequantize_match_the_reference_within_the_int8_bound(dtype, dim, layout, block_size):
    gen = torch.Generator().manual_seed(dim * 3 + block_size)
    layers, heads = 2, 2
    caches = Caches.make(layers, cache_shape(5, block_size, heads, dim, layout), dtype, gen, gap=7)
    ids = torch.tensor([4, 0, 2])
    q_shape = (3, layers, 2, *caches.k[0].shape[1:])
    q_storage, q = guarded(q_shape, torch.int8, gen)
    s_storage, scales = guarded((3, layers, 2, heads), torch.float32, gen)
    poison(q)
    poison(scales)
    eq_storage, expected_q = twin_buffer(q_storage, q)
    es_storage, expected_scales = twin_buffer(s_storage, scales)
    before = caches.twin()
    K.quantize_blocks_int8(caches.k, caches.v, ids, layout=layout, out=q, scales=scales, backend="triton")
    reference.quantize_blocks_int8(before.k, before.v, ids, layout, expected_q, expected_scales)
    assert same_bits(q_storage, eq_storage) and same_bits(s_storage, es_storage)
    caches.assert_same(before)

    # Per head: the scale is absmax / 127, and the absmax element is +-127.
    x = reference_gather(before, ids).float()
    head_axis = 4 if layout == "NHD" else 3
    per_head = x.movedim(head_axis, 3).flatten(4)  # [n, layers, 2, heads, block_size * dim]
    absmax = per_head.abs().amax(dim=4)
    assert torch.equal(scales, absmax / 127)
    assert bool((q.movedim(head_axis, 3).flatten(4).abs().amax(dim=4) == 127).all())

    # Dequantize into other blocks (poisoned first); each element within scale / 2 of the original,
    # plus the rounding to the cache dtype.
    dst = torch.tensor([1, 3, 4])
    for cache in caches.k + caches.v:
        poison(cache[dst])
    expected = caches.twin()
    K.dequantize_blocks_int8(q, scales, caches.k, caches.v, dst, layout=layout, backend="triton")
    reference.dequantize_blocks_int8(q, scales, expected.k, expected.v, dst, layout)
    caches.assert_same(expected)
    back = reference_gather(caches, dst).float().movedim(head_axis, 3).flatten(4)
    ulp = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}[dtype]
    bound = scales[..., None] / 2 * (1 + 2.0**-20) + per_head.abs() * ulp
    assert bool(((back - per_head).abs() <= bound).all())


def test_an_all_zero_head_quantizes_to_zeros_with_scale_zero():
    gen = torch.Generator().manual_seed(8)
    caches = Caches.make(1, (2, 16, 2, 64), torch.float16, gen)
    caches.k[0][1, :, 1] = 0.0
    q, scales = K.quantize_blocks_int8(caches.k, caches.v, torch.tensor([1]), backend="triton")
    assert scales[0, 0, 0, 1] == 0.0 and bool((q[0, 0, 0, :, 1] == 0).all())
    assert bool((scales[0, 0, 0, 0] > 0) & (scales[0, 0, 1] > 0).all())


# ---- on memory mapped by kvmem ----


def fake_cuda_views(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """CPU tensors over a cache's ranges on the fake CUDA device.

    The fake driver's "device memory" is host memory: a reservation is an anonymous mapping, a
    page a memfd mapped MAP_SHARED|MAP_FIXED at its device address, and cuMemSetAccess mprotects
    it read/write (tests/fakecuda/fakecuda.c, design comment). So the device addresses of mapped
    blocks are valid host addresses, and the interpreter, which loads and stores through raw
    addresses of CPU tensors, runs on kvmem's own mapped memory. (torch here is CPU-only, so the
    cache itself makes no tensors: `cache.k` holds None.)
    """

    def view(layer: int, kind: str) -> torch.Tensor:
        raw = (ctypes.c_ubyte * cache.range_bytes).from_address(cache.range_address(layer, kind))
        d = cache.layout_descriptor
        return torch.frombuffer(raw, dtype=torch.uint8).view(cache.dtype).view(d.shape)

    return [view(layer, "k") for layer in range(cache.num_layers)], [
        view(layer, "v") for layer in range(cache.num_layers)
    ]


@pytest.mark.parametrize("device", ["host", "cuda"])
def test_kernels_on_a_kvmem_cache(device: str):
    gen = torch.Generator().manual_seed(9)
    layout = "HND" if device == "cuda" else "NHD"
    with kvmem.local(device=device, budget="64MiB") as session:
        # One slot (512 blocks of 4 KiB) per range, all of it mapped: the views touch mapped pages only.
        cache = session.kv_cache(
            num_layers=2,
            block_size=16,
            num_kv_heads=2,
            head_dim=64,
            max_tokens=512 * 16,
            layout=layout,
            background=False,
        )
        ids = cache.alloc(cache.max_blocks)
        if device == "host":
            k, v = cache.k, cache.v
        else:
            assert cache.k == [None, None]
            k, v = fake_cuda_views(cache)
        for tensor in k + v:
            tensor.copy_(rand(tuple(tensor.shape), torch.float16, gen))
        twin_k, twin_v = [t.clone() for t in k], [t.clone() for t in v]

        key, value = rand((5, 2, 64), torch.float16, gen), rand((5, 2, 64), torch.float16, gen)
        slots = torch.tensor([511 * 16 + 15, 0, 33, -1, 7 * 16 + 4])
        K.write_kv(key, value, k[1], v[1], slots, layout=layout, backend="triton")
        reference.write_kv(key, value, twin_k[1], twin_v[1], slots, layout, None, None)

        out = K.gather_blocks(k, v, torch.tensor([511, 0, 7]), backend="triton")
        K.move_blocks(k, v, torch.tensor([511, 7]), torch.tensor([100, 200]), backend="triton")
        reference.move_blocks(twin_k, twin_v, torch.tensor([511, 7]), torch.tensor([100, 200]))
        K.scatter_blocks(out, k, v, torch.tensor([300, 301, 302]), backend="triton")
        reference.scatter_blocks(out, twin_k, twin_v, torch.tensor([300, 301, 302]))
        q, scales = K.quantize_blocks_int8(k, v, torch.tensor([300, 5]), layout=layout, backend="triton")
        K.dequantize_blocks_int8(q, scales, k, v, torch.tensor([400, 401]), layout=layout, backend="triton")
        reference.dequantize_blocks_int8(q, scales, twin_k, twin_v, torch.tensor([400, 401]), layout)

        for tensor, twin in zip(k + v, twin_k + twin_v, strict=True):
            assert same_bits(tensor, twin)
        # Read back through the device: the kernels wrote kvmem's mapped pages.
        for layer, kind, block in ((1, "k", 511), (0, "v", 100), (1, "v", 302), (0, "k", 401)):
            expected = (twin_k if kind == "k" else twin_v)[layer][block]
            raw = cache.device.read(cache.block_address(layer, kind, block), cache.block_bytes)
            assert raw == words(expected).contiguous().numpy().tobytes()
        del k, v
        cache.free(ids)


GPU_CHECK = """
import torch, kvmem
import kvmem.kernels as K
from kvmem.kernels import reference as R
from kvmem.kernels.reference import words

assert torch.cuda.is_available(), "CUDA torch is needed for this test"
assert K.backend_for(torch.empty(1, device="cuda")) == "triton"
gen = torch.Generator().manual_seed(0)


def same(a, b):
    return torch.equal(words(a.cpu()), words(b.cpu()))


def randn(shape, dtype, scale=4.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


for layout, dim, dtype, rows in (("NHD", 80, "float16", "float32"), ("HND", 128, "bfloat16", "bfloat16"),
                                 ("NHD", 120, "float8_e4m3fn", "float16"), ("HND", 96, "int8", "float32")):
    with kvmem.local(device="cuda", budget="256MiB") as session:
        cache = session.kv_cache(num_layers=2, block_size=16, num_kv_heads=2, head_dim=dim, dtype=dtype,
                                 layout=layout, max_tokens=4096, background=False)
        ids = cache.alloc(cache.max_blocks)
        for t in cache.k + cache.v:
            t.copy_(randn(tuple(t.shape), t.dtype).cuda())
        tk, tv = [t.cpu() for t in cache.k], [t.cpu() for t in cache.v]
        n = cache.max_blocks
        key, value = randn((5, 2, dim), getattr(torch, rows), 30.0), randn((5, 2, dim), getattr(torch, rows), 30.0)
        slots = torch.tensor([n * 16 - 1, 0, -1, 33, 70])
        scales = {}
        if dtype in ("float8_e4m3fn", "int8"):
            scales = {"k_scale": torch.tensor([0.2, 0.3]), "v_scale": torch.tensor([0.25])}
        K.write_kv(key.cuda(), value.cuda(), cache.k[1], cache.v[1], slots.cuda(), layout=layout,
                   **{k: v.cuda() for k, v in scales.items()})
        R.write_kv(key, value, tk[1], tv[1], slots, layout, scales.get("k_scale"), scales.get("v_scale"))
        src, dst = torch.tensor([n - 1, 0, 4]), torch.tensor([7, 8, 9])
        out = K.gather_blocks(cache.k, cache.v, src.cuda())
        expected = torch.empty(out.shape, dtype=out.dtype)
        R.gather_blocks(tk, tv, src, expected)
        assert same(out, expected), "gather_blocks"
        K.move_blocks(cache.k, cache.v, src.cuda(), dst.cuda())
        R.move_blocks(tk, tv, src, dst)
        K.scatter_blocks(out, cache.k, cache.v, torch.tensor([20, 21, 22]).cuda())
        R.scatter_blocks(expected, tk, tv, torch.tensor([20, 21, 22]))
        if dtype in ("float16", "bfloat16"):
            q, s = K.quantize_blocks_int8(cache.k, cache.v, src.cuda(), layout=layout)
            eq, es = torch.empty(q.shape, dtype=torch.int8), torch.empty(s.shape)
            R.quantize_blocks_int8(tk, tv, src, layout, eq, es)
            assert same(q, eq) and same(s, es), "quantize_blocks_int8"
            K.dequantize_blocks_int8(q, s, cache.k, cache.v, dst.cuda(), layout=layout)
            R.dequantize_blocks_int8(eq, es, tk, tv, dst, layout)
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(cache.k + cache.v, tk + tv)):
            assert same(a, b), f"{layout} {dim} {dtype}: range {i} differs from the reference"
        cache.free(ids)
print("ok")
"""


@pytest.mark.gpu
def test_compiled_kernels_on_a_real_gpu_match_the_reference():
    """The compiled (not interpreted) kernels on a kvmem cache on a real GPU, against the CPU reference."""
    env = {k: v for k, v in real_driver_env().items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", GPU_CHECK], env=env, capture_output=True, text=True, timeout=900, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---- argument checks ----


def _error_cases():
    gen = torch.Generator().manual_seed(10)
    k = [rand((4, 16, 2, 64), torch.float16, gen) for _ in range(2)]
    v = [rand((4, 16, 2, 64), torch.float16, gen) for _ in range(2)]
    key = rand((3, 2, 64), torch.float16, gen)
    fp8 = rand((4, 16, 2, 64), torch.float8_e4m3fn, gen)
    scale = torch.tensor([0.5])
    slots = torch.tensor([1, 2, 3])
    ids = torch.tensor([0, 1])
    return [
        (lambda: K.write_kv(key, key, k[0], v[0], torch.tensor([1, 64, 2])), "slot_mapping[1]=64 is out of range"),
        (lambda: K.write_kv(key, key, k[0], v[0], torch.tensor([5, -1, 5])), "names slot 5 more than once"),
        (lambda: K.write_kv(key, key, k[0], v[0], slots.float()), "slot_mapping has dtype torch.float32"),
        (lambda: K.write_kv(key, key, k[0], v[0], slots[:2]), "2 slots for 3 tokens"),
        (lambda: K.write_kv(key, key[:, :, :32], k[0], v[0], slots), "value is (3, 2, 32)"),
        (lambda: K.write_kv(key, key, k[0], v[0], slots, layout="HND"), "the HND cache (4, 16, 2, 64) holds 16 heads"),
        (lambda: K.write_kv(key, key, k[0], v[0][:2], slots), "value_cache has shape (2, 16, 2, 64)"),
        (lambda: K.write_kv(key, key, k[0], v[0].float(), slots), "value_cache has dtype torch.float32"),
        (lambda: K.write_kv(key, key, k[0], v[0], slots, layout="NDH"), "layout='NDH' is not one of NHD, HND"),
        (lambda: K.write_kv(key.int(), key.int(), k[0], v[0], slots), "key has dtype torch.int32"),
        (lambda: K.write_kv(key, key, k[0], v[0], slots.to("meta")), "slot_mapping is on meta, the caches on cpu"),
        (lambda: K.write_kv(key, key, k[0], v[0], slots, k_scale=scale, v_scale=scale), "k_scale is given but"),
        (lambda: K.write_kv(key, key, fp8, fp8.clone(), slots), "k_scale is required for a torch.float8_e4m3fn cache"),
        (
            lambda: K.write_kv(key, key, fp8, fp8.clone(), slots, k_scale=torch.ones(3), v_scale=scale),
            "k_scale must be a float32 tensor of 1 or 2 (kv_heads) values",
        ),
        (
            lambda: K.write_kv(key, key, fp8.view(torch.float8_e5m2), fp8.view(torch.float8_e5m2), slots),
            "write_kv stores into float16, bfloat16, float32, float8_e4m3fn, int8",
        ),
        (lambda: K.write_kv(key, key, k[0], v[0], slots, backend="cuda"), "backend='cuda' is not one of triton, torch"),
        (lambda: K.gather_blocks(k, v, torch.tensor([0, 4])), "block_ids[1]=4 is out of range: blocks are 0..3"),
        (lambda: K.gather_blocks(k, v, torch.tensor([-1])), "block_ids[0]=-1 is out of range"),
        (lambda: K.gather_blocks(k, v[:1], ids), "k_caches has 2 layers and v_caches 1"),
        (lambda: K.gather_blocks(k[0], v[0], ids), "must be sequences of per-layer tensors"),
        (lambda: K.gather_blocks([k[0], k[1][:3]], v, ids), "k_caches[1] has shape (3, 16, 2, 64)"),
        (
            lambda: K.gather_blocks([t.transpose(1, 2) for t in k], [t.transpose(1, 2) for t in v], ids),
            "each block must be contiguous",
        ),
        (
            lambda: K.gather_blocks(k, v, ids, torch.empty(2, 2, 2, 16, 2, 32, dtype=torch.float16)),
            "out is (2, 2, 2, 16, 2, 32)",
        ),
        (lambda: K.gather_blocks(k, v, ids.view(1, 2)), "block_ids must be a 1-D tensor, got shape (1, 2)"),
        (
            lambda: K.scatter_blocks(torch.empty(2, 2, 2, 16, 2, 64, dtype=torch.float16), k, v, torch.tensor([3, 3])),
            "names block 3 more than once",
        ),
        (
            lambda: K.scatter_blocks(torch.empty(2, 2, 16, 2, 64, dtype=torch.float16), k, v, ids),
            "buffer must be a 6-D tensor",
        ),
        (lambda: K.move_blocks(k, v, torch.tensor([0, 1]), torch.tensor([1, 2])), "dst_ids[0]=1 is also a source"),
        (lambda: K.move_blocks(k, v, torch.tensor([0]), torch.tensor([1, 2])), "src_ids has 1 ids and dst_ids 2"),
        (
            lambda: K.move_blocks(k, v, torch.tensor([0, 1]), torch.tensor([2, 2])),
            "dst_ids names block 2 more than once",
        ),
        (
            lambda: K.quantize_blocks_int8([fp8], [fp8], ids),
            "int8 quantization takes float16, bfloat16, float32 caches",
        ),
        (lambda: K.quantize_blocks_int8(k, v, ids, scales=torch.empty(2, 2, 2, 3)), "scales is (2, 2, 2, 3)"),
        (
            lambda: K.dequantize_blocks_int8(
                torch.empty(2, 2, 2, 16, 2, 64, dtype=torch.int8), torch.empty(2, 2, 2, 2), k, v, torch.tensor([1, 1])
            ),
            "names block 1 more than once",
        ),
        (
            lambda: K.dequantize_blocks_int8(torch.empty(2, 2, 2, 16, 2, 64), torch.empty(2, 2, 2, 2), k, v, ids),
            "q is (2, 2, 2, 16, 2, 64) torch.float32",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_error_cases())))
def test_bad_arguments_are_one_line_value_errors(case: int):
    call, message = _error_cases()[case]
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    assert message in text and "\n" not in text


# ---- the benchmark script ----


def test_the_benchmark_cases_run_and_count_their_floor():
    """The GPU benchmark's cases, on small CPU caches: each call is valid and its floor exact."""
    from benchmarks.bench_kernels import build_cases

    gen = torch.Generator().manual_seed(11)
    caches = Caches.make(2, (6, 16, 2, 64), torch.float16, gen)
    cases = build_cases(caches.k, caches.v, tokens=5, blocks=2)
    block_bytes = 16 * 2 * 64 * 2
    floors = {case.name: case.floor_bytes for case in cases}
    assert floors["gather_blocks"] == floors["move_blocks"] == 2 * (2 * 4 * block_bytes)
    assert floors["write_kv (float16 -> float16)"] == 2 * (2 * 5 * 2 * 64 * 2) + 5 * 8
    assert floors["quantize_blocks_int8"] == 2 * 4 * block_bytes + 2 * 4 * block_bytes // 2 + 2 * 4 * 2 * 4
    for case in cases:
        case.run()
        if case.name == "move_blocks":  # blocks 0, 1 of every layer to 2, 3
            assert same_bits(caches.k[1][2:4], caches.k[1][0:2]) and same_bits(caches.v[0][2:4], caches.v[0][0:2])


def test_the_benchmark_needs_a_gpu_and_says_so_on_cpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_kernels.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "needs a CUDA GPU" in result.stdout
