"""KV data-movement kernels on a GPU: achieved bandwidth against a device-to-device copy.

Each kernel of `kvmem.kernels` runs on the tensors of a kvmem cache (Llama-3-8B geometry: 32
layers, 8 KV heads, head dim 128, float16, blocks of 16 tokens, so 32 KiB per block of one
layer's K or V) mapped through the CUDA VMM API, with `validate=False` (no host-side id checks,
so no synchronization in the timed region). Its floor is the bytes it must read plus the bytes it
must write (benchmarks/README.md lists them); the baseline is `torch`'s copy of half that many
bytes between two device buffers, which moves the same total. Times are CUDA-event medians of
`--runs` runs after `--warmup` runs; achieved bandwidth = floor / time.

Where no CUDA device is present it says so and exits 0 (nothing is measured or written).

    python benchmarks/bench_kernels.py [--tokens N] [--blocks N] [--runs N] [--out FILE] [--update-readme]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, replace_readme_section, run_header  # noqa: E402

GEOMETRY = {"num_layers": 32, "block_size": 16, "num_kv_heads": 8, "head_dim": 128, "dtype": "float16"}


@dataclass
class Case:
    name: str
    floor_bytes: int  # bytes the kernel must read plus the bytes it must write
    run: Callable[[], object]


def build_cases(k: list, v: list, tokens: int, blocks: int, layout: str = "NHD") -> list[Case]:
    """The benchmark cases over per-layer caches `k`, `v` (at least ``3 * blocks`` blocks each).

    write_kv writes `tokens` new rows into layer 0; the block operations take `blocks` blocks of
    every layer.
    """
    import torch

    import kvmem.kernels as kernels

    device = k[0].device
    layers = len(k)
    heads, dim = (k[0].shape[2], k[0].shape[3]) if layout == "NHD" else (k[0].shape[1], k[0].shape[3])
    block_size = k[0].shape[1] if layout == "NHD" else k[0].shape[2]
    itemsize = k[0].element_size()
    block_bytes = k[0][0].numel() * itemsize
    ranges = 2 * layers
    generator = torch.Generator(device=device).manual_seed(0)
    key = torch.randn((tokens, heads, dim), generator=generator, device=device).to(k[0].dtype)
    value = torch.randn((tokens, heads, dim), generator=generator, device=device).to(k[0].dtype)
    slots = torch.randperm(k[0].shape[0] * block_size, generator=generator, device=device)[:tokens]
    fp8_cache = torch.empty(k[0].shape, dtype=torch.float8_e4m3fn, device=device)
    fp8_values = torch.empty_like(fp8_cache)
    scales = torch.full((heads,), 0.05, device=device)
    src = torch.arange(blocks, device=device)
    dst = torch.arange(blocks, 2 * blocks, device=device)
    buffer = kernels.gather_blocks(k, v, src, validate=False)
    q, q_scales = kernels.quantize_blocks_int8(k, v, src, layout=layout, validate=False)
    rows_bytes = 2 * tokens * heads * dim * itemsize  # K and V rows
    moved = blocks * ranges * block_bytes  # one copy of the blocks of every range
    quantized = blocks * ranges * (block_bytes // itemsize) + q_scales.numel() * 4  # int8 values + float32 scales
    return [
        Case(
            "write_kv (float16 -> float16)",
            2 * rows_bytes + slots.numel() * slots.element_size(),
            lambda: kernels.write_kv(key, value, k[0], v[0], slots, layout=layout, validate=False),
        ),
        Case(
            "write_kv (float16 -> float8_e4m3fn, per-head scale)",
            rows_bytes + rows_bytes // itemsize + slots.numel() * slots.element_size() + 2 * scales.numel() * 4,
            lambda: kernels.write_kv(
                key, value, fp8_cache, fp8_values, slots, layout=layout, k_scale=scales, v_scale=scales, validate=False
            ),
        ),
        Case("gather_blocks", 2 * moved, lambda: kernels.gather_blocks(k, v, src, buffer, validate=False)),
        Case("scatter_blocks", 2 * moved, lambda: kernels.scatter_blocks(buffer, k, v, dst, validate=False)),
        Case("move_blocks", 2 * moved, lambda: kernels.move_blocks(k, v, src, dst, validate=False)),
        Case(
            "quantize_blocks_int8",
            moved + quantized,
            lambda: kernels.quantize_blocks_int8(k, v, src, layout=layout, out=q, scales=q_scales, validate=False),
        ),
        Case(
            "dequantize_blocks_int8",
            quantized + moved,
            lambda: kernels.dequantize_blocks_int8(q, q_scales, k, v, dst, layout=layout, validate=False),
        ),
    ]


def time_ms(run: Callable[[], object], warmup: int, runs: int) -> float:
    """Median CUDA-event time of `run` in milliseconds."""
    import torch

    for _ in range(warmup):
        run()
    samples = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def measure(cases: list[Case], warmup: int, runs: int) -> list[dict]:
    import torch

    rows = []
    for case in cases:
        kernel_ms = time_ms(case.run, warmup, runs)
        half = case.floor_bytes // 2
        a, b = torch.empty(half, dtype=torch.uint8, device="cuda"), torch.empty(half, dtype=torch.uint8, device="cuda")
        copy_ms = time_ms(lambda a=a, b=b: b.copy_(a), warmup, runs)
        del a, b
        rows.append(
            {
                "kernel": case.name,
                "floor_bytes": case.floor_bytes,
                "kernel_ms": round(kernel_ms, 4),
                "copy_ms": round(copy_ms, 4),
                "kernel_gb_s": round(case.floor_bytes / kernel_ms / 1e6, 1),
                "copy_gb_s": round(2 * half / copy_ms / 1e6, 1),
                "kernel_over_copy": round(copy_ms / kernel_ms, 3),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| kernel | floor (MiB moved) | kernel GB/s | D2D copy GB/s | kernel / copy |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['floor_bytes'] / 2**20:.1f} | {r['kernel_gb_s']} | {r['copy_gb_s']} | "
            f"{r['kernel_over_copy']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="rows write_kv writes")
    parser.add_argument("--blocks", type=int, default=128, help="blocks of every layer the block kernels move")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_kernels.json")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (torch sees none); nothing measured")
        return 0
    import kvmem

    max_tokens = max(3 * args.blocks, -(-args.tokens // GEOMETRY["block_size"])) * GEOMETRY["block_size"]
    with kvmem.local(device="cuda") as session:
        cache = session.kv_cache(**GEOMETRY, max_tokens=max_tokens, background=False)
        ids = cache.alloc(cache.max_blocks)
        for tensor in cache.k + cache.v:
            tensor.normal_()
        rows = measure(build_cases(cache.k, cache.v, args.tokens, args.blocks), args.warmup, args.runs)
        torch.cuda.synchronize()
        cache.free(ids)
    result = {
        "benchmark": "bench_kernels",
        "machine": {**machine(), "gpu": torch.cuda.get_device_name()},
        "geometry": GEOMETRY,
        "tokens": args.tokens,
        "blocks": args.blocks,
        "warmup": args.warmup,
        "runs": args.runs,
        "kernels": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {args.out}")
    if args.update_readme:
        detail = (
            f"{result['machine']['gpu']}, {args.tokens} tokens for write_kv, {args.blocks} blocks of each of "
            f"{2 * GEOMETRY['num_layers']} ranges for the block kernels, median of {args.runs} runs"
        )
        replace_readme_section("bench_kernels", f"{run_header(result['machine'], detail)}\n\n{table(rows)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
