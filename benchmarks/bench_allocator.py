"""Alloc/free throughput of `BlockAllocator` against a plain free list, in one run.

Geometry: Llama-3-8B-like (32 layers, 8 KV heads, head dim 128, fp16) with blocks of 16 tokens, so
a block is 16 * 8 * 128 * 2 B = 32 KiB per layer's K or V; a 2 MiB page holds 64 blocks, the
blocks per slot. 1024 slots are mapped (65536 blocks).

The baseline of the bare allocator is the fastest plain free list found here: a list of block ids,
alloc(n) slices n off its tail, free(ids) extends it (about twice as fast as vLLM's deque popped in a
Python loop). Both sides are called the same way, as bound methods `alloc(n)` and `free(ids)`
(kvmem's `BlockAllocator` directly: its own mutex, which every call takes, is part of it).

The engine paths: what engines call, `ElasticKVCache.alloc`/`free` (one call each into the C
allocator, `kvmem._block_allocator`: its own mutex, the cache's gate, the growth wake-up),
and vLLM's way (its own free queue picks the ids, then `take`/`free` tell kvmem), against the list,
the same list behind a lock (the least a free list shared with a growth thread must do) and the
deque, all in alternating chunks of the same as-allocated workload.

Steady state: half the blocks are live. One operation is alloc(n) plus one free of n blocks, for
n = 1, 16 and 256, in three workloads:

- as allocated: the live blocks are held in batches of n; each operation allocates a batch and
  frees a randomly chosen earlier batch, as alloc returned it, in its place;
- reversed: the same, each batch freed in reverse order (vLLM frees a request's blocks tail first);
- scattered: each operation frees n live blocks picked at random (wherever they lie), as one batch.

Both sides go through the same random sequence, after a warm-up that brings the allocator to its
steady state (fragmented, for the scattered workload). Each repetition builds both sides afresh and
times them in alternating chunks of operations, so that both run under the same conditions on a
noisy machine; figures are medians over repetitions. The first two workloads time the whole loop
(the same few bytecodes of bookkeeping on both sides); the scattered one times only the alloc and
free calls, since picking the blocks costs more than freeing them on the free list.

    python benchmarks/bench_allocator.py [--repeats N] [--scale X] [--workloads a,b] [--impl FILE]
        [--out FILE] [--update-readme]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import random
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import load, machine, replace_readme_section, run_header, spread  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, DTYPE_BYTES, BLOCK_TOKENS = 32, 8, 128, 2, 16
PAGE_BYTES = 2 << 20
BLOCK_BYTES = BLOCK_TOKENS * KV_HEADS * HEAD_DIM * DTYPE_BYTES  # per layer, K or V
BLOCKS_PER_SLOT = PAGE_BYTES // BLOCK_BYTES
SLOTS = 1024
OCCUPANCY = 0.5
# Timed operations per repetition for each batch size (times --scale).
BATCHES = {1: 100_000, 16: 20_000, 256: 2_000}
CHUNKS = 20  # each side's timed operations come in this many chunks, alternating with the other's
SIDES = ("kvmem", "baseline")


class FreeList:
    """vLLM's static pool, reduced to its free list: a deque of ids, popped left, extended right."""

    def __init__(self, num_blocks: int) -> None:
        self._free = deque(range(num_blocks))

    def alloc(self, n: int) -> list[int]:
        free = self._free
        popleft = free.popleft
        return [popleft() for _ in range(min(n, len(free)))]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)


class ListFreeList:
    """The fastest plain free list found here: a list of ids, alloc slices its tail off, free extends it
    (about twice the deque popped in a Python loop)."""

    def __init__(self, num_blocks: int) -> None:
        self._free = list(range(num_blocks))

    def alloc(self, n: int) -> list[int]:
        free = self._free
        ids = free[-n:] if n else []
        del free[len(free) - len(ids) :]
        return ids

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)


class LockedListFreeList(ListFreeList):
    """`ListFreeList` behind a lock: the least a free list shared with another thread must do (an
    elastic cache shares its blocks with its growth thread)."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self._lock = threading.Lock()

    def alloc(self, n: int) -> list[int]:
        with self._lock:
            free = self._free
            ids = free[-n:] if n else []
            del free[len(free) - len(ids) :]
            return ids

    def free(self, block_ids: list[int]) -> None:
        with self._lock:
            self._free.extend(block_ids)


def load_allocator_class(path: Path | None) -> type:
    if path is None:
        from kvmem.block_allocator import BlockAllocator

        return BlockAllocator
    spec = importlib.util.spec_from_file_location("bench_block_allocator_impl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BlockAllocator


def make(side: str, allocator_class: type) -> object:
    if side == "baseline":
        return ListFreeList(SLOTS * BLOCKS_PER_SLOT)
    a = allocator_class(BLOCKS_PER_SLOT, SLOTS)
    for slot in range(SLOTS):
        a.add_slot(slot)
    return a


def run_pair(allocator_class: type, workload: str, n: int, ops: int, seed: int) -> dict[str, dict]:
    """One repetition: both sides through the same operations, timed in alternating chunks.

    Alternating chunks of operations (rather than one side's whole run, then the other's) puts both
    sides under the same conditions on a noisy machine.
    """
    pool_size = int(SLOTS * BLOCKS_PER_SLOT * OCCUPANCY) // n
    rng = random.Random(seed)
    steps = [rng.randrange(pool_size) for _ in range(max(ops // 2, 2 * pool_size) + ops)]
    if workload == "scattered":  # which n live blocks each operation frees
        live = pool_size * n
        steps = [rng.sample(range(live), n) for _ in steps]
    warm, timed = steps[:-ops], steps[-ops:]
    chunk = max(1, ops // CHUNKS)
    step = STEPS[workload]

    state = {}
    for side in SIDES:
        a = make(side, allocator_class)
        alloc, free = a.alloc, a.free
        pool = [alloc(n) for _ in range(pool_size)]
        if workload == "scattered":
            pool = [b for batch in pool for b in batch]
        step(alloc, free, pool, warm, n)
        state[side] = (alloc, free, pool)

    elapsed = dict.fromkeys(SIDES, 0)
    gc.collect()
    gc.disable()
    try:
        for c, start in enumerate(range(0, ops, chunk)):
            part = timed[start : start + chunk]
            for side in SIDES if c % 2 == 0 else SIDES[::-1]:
                alloc, free, pool = state[side]
                elapsed[side] += step(alloc, free, pool, part, n)
    finally:
        gc.enable()
    return {side: {"ops_per_s": ops / (elapsed[side] / 1e9)} for side in SIDES}


def as_allocated(alloc, free, pool: list, victims: list[int], n: int) -> int:
    """Allocate a batch, free the batch at `victim` as alloc returned it, keep the new one there."""
    t0 = time.perf_counter_ns()
    for i in victims:
        new = alloc(n)
        free(pool[i])
        pool[i] = new
    return time.perf_counter_ns() - t0


def reversed_order(alloc, free, pool: list, victims: list[int], n: int) -> int:
    """As `as_allocated`, each batch kept and freed in reverse order (as vLLM frees a request's blocks)."""
    t0 = time.perf_counter_ns()
    for i in victims:
        new = alloc(n)
        new.reverse()
        free(pool[i])
        pool[i] = new
    return time.perf_counter_ns() - t0


def scattered(alloc, free, live: list[int], picks: list[list[int]], n: int) -> int:
    """Allocate a batch, free `n` live blocks picked at random: only the calls are timed."""
    clock = time.perf_counter_ns
    elapsed = 0
    for positions in picks:
        t0 = clock()
        new = alloc(n)
        t1 = clock()
        batch = [live[p] for p in positions]
        t2 = clock()
        free(batch)
        elapsed += clock() - t2 + t1 - t0
        for p, b in zip(positions, new, strict=True):
            live[p] = b
    return elapsed


STEPS = {"as allocated": as_allocated, "reversed": reversed_order, "scattered": scattered}


# The engine paths: an ElasticKVCache of one layer (the hot path does not depend on the layer count)
# with blocks of 32 KiB, 64 per page, CACHE_SLOTS slots mapped, its background thread running.
CACHE_SLOTS = 256
CACHE_GEOMETRY = {"num_layers": 1, "block_size": 16, "num_kv_heads": 8, "head_dim": 128, "dtype": "float16"}
ENGINE_SIDES = ("cache alloc/free", "cache take/free", "deque", "list", "locked list")


def engine_cache(session):
    """A cache with `CACHE_SLOTS` slots mapped, whose watermarks never grow nor shrink it while timed."""
    blocks = CACHE_SLOTS * BLOCKS_PER_SLOT
    cache = session.kv_cache(
        **CACHE_GEOMETRY, max_tokens=blocks * 16, low_watermark=0, high_watermark=blocks, grow_wait=10
    )
    if cache.map_slots(range(CACHE_SLOTS)) is not None:
        raise SystemExit("bench_allocator: could not map the cache's slots")
    return cache


def engine_sides(sessions: list) -> dict[str, tuple]:
    """Each side as (alloc(n), free(ids)), the way engines call them, and what to close after."""
    blocks = CACHE_SLOTS * BLOCKS_PER_SLOT
    sides: dict[str, tuple] = {}
    cache = engine_cache(sessions[0])
    sides["cache alloc/free"] = (cache.alloc, cache.free, cache)
    # vLLM's way: the engine's own free queue picks the ids, kvmem is told with take() and free().
    picker = engine_cache(sessions[1])
    queue = deque(range(blocks))
    popleft, take, cache_free, extend = queue.popleft, picker.take, picker.free, queue.extend

    def take_alloc(n: int) -> list[int]:
        ids = [popleft() for _ in range(n)]
        take(ids)
        return ids

    def take_free(ids: list[int]) -> None:
        cache_free(ids)
        extend(ids)

    sides["cache take/free"] = (take_alloc, take_free, picker)
    for name, cls in (("deque", FreeList), ("list", ListFreeList), ("locked list", LockedListFreeList)):
        baseline = cls(blocks)
        sides[name] = (baseline.alloc, baseline.free, None)
    return sides


def run_engine_pair(n: int, ops: int, seed: int) -> dict[str, float]:
    """One repetition of the as-allocated workload on every engine side, in alternating chunks."""
    import kvmem

    pool_size = int(CACHE_SLOTS * BLOCKS_PER_SLOT * OCCUPANCY) // n
    rng = random.Random(seed)
    steps = [rng.randrange(pool_size) for _ in range(max(ops // 2, 2 * pool_size) + ops)]
    warm, timed = steps[:-ops], steps[-ops:]
    chunk = max(1, ops // CHUNKS)
    budget = 4 * CACHE_SLOTS * PAGE_BYTES
    with kvmem.local(device="host", budget=budget) as one, kvmem.local(device="host", budget=budget) as two:
        sides = engine_sides([one, two])
        state = {}
        for name, (alloc, free, _) in sides.items():
            pool = [alloc(n) for _ in range(pool_size)]
            as_allocated(alloc, free, pool, warm, n)
            state[name] = (alloc, free, pool)
        elapsed = dict.fromkeys(sides, 0)
        order = list(sides)
        gc.collect()
        gc.disable()
        try:
            for c, start in enumerate(range(0, ops, chunk)):
                part = timed[start : start + chunk]
                for name in order[c % len(order) :] + order[: c % len(order)]:  # rotate who goes first
                    alloc, free, pool = state[name]
                    elapsed[name] += as_allocated(alloc, free, pool, part, n)
        finally:
            gc.enable()
        for _, _, cache in sides.values():
            if cache is not None:
                cache.close()
    return {name: ops / (elapsed[name] / 1e9) for name in sides}


def bench_engine_paths(repeats: int, scale: float) -> dict:
    out: dict = {}
    for n, base_ops in BATCHES.items():
        ops = max(100, int(base_ops * scale))
        runs = []
        for r in range(repeats):
            rates = run_engine_pair(n, ops, seed=7000 * n + r)
            rates["load"] = load()[0]
            runs.append(rates)
        entry: dict = {"batch": n, "ops_per_repeat": ops, "loads": [run["load"] for run in runs]}
        for name in ENGINE_SIDES:
            entry[name] = {"ops_per_s": round(statistics.median(run[name] for run in runs))}
        for kvmem_side in ("cache alloc/free", "cache take/free"):
            for baseline in ("deque", "list", "locked list"):
                entry[f"{kvmem_side} / {baseline}"] = spread([run[kvmem_side] / run[baseline] for run in runs])
        out[f"{n} blocks"] = entry
        print(
            f"engine paths, batch {n:>3}: "
            + ", ".join(f"{name} {entry[name]['ops_per_s']:,}" for name in ENGINE_SIDES)
            + f"; alloc/free vs locked list {entry['cache alloc/free / locked list']['median']:.2f}x, "
            f"vs list {entry['cache alloc/free / list']['median']:.2f}x; take/free vs deque "
            f"{entry['cache take/free / deque']['median']:.2f}x",
            flush=True,
        )
    return out


def bench(allocator_class: type, repeats: int, scale: float, workloads: list[str]) -> dict:
    out: dict = {}
    for workload in workloads:
        for n, base_ops in BATCHES.items():
            ops = max(100, int(base_ops * scale))
            runs = [run_pair(allocator_class, workload, n, ops, seed=1000 * n + r) for r in range(repeats)]
            entry: dict = {"workload": workload, "batch": n, "ops_per_repeat": ops}
            for side in SIDES:
                rates = [run[side]["ops_per_s"] for run in runs]
                entry[side] = {
                    "ops_per_s": round(statistics.median(rates)),
                    "blocks_per_s": round(statistics.median(rates) * n),
                    "ops_per_s_all": [round(r) for r in rates],
                }
            ratios = [run["kvmem"]["ops_per_s"] / run["baseline"]["ops_per_s"] for run in runs]
            entry["ratio"] = round(statistics.median(ratios), 3)
            entry["ratio_all"] = [round(r, 3) for r in ratios]
            if workload == "as allocated":
                entry["goal"] = 1.0 if n >= 16 else 0.5
            out[f"{workload}, {n} blocks"] = entry
            print(
                f"{workload:>12}, batch {n:>3}: kvmem {entry['kvmem']['ops_per_s']:>9} ops/s, "
                f"free list {entry['baseline']['ops_per_s']:>9} ops/s, ratio {entry['ratio']:.2f}x "
                f"(repetitions: {', '.join(f'{r:.2f}' for r in ratios)})",
                flush=True,
            )
    return out


def table(result: dict) -> str:
    lines = [
        "| workload | batch | BlockAllocator ops/s | list free list ops/s | BlockAllocator / list | goal |",
        "|---|---|---|---|---|---|",
    ]
    for e in result["batches"].values():
        goal = ""
        if "goal" in e:
            goal = f">= {e['goal']:.1f}x, " + ("met" if e["ratio"] >= e["goal"] else "not met")
        lines.append(
            f"| {e['workload']} | {e['batch']} | {e['kvmem']['ops_per_s']:,} | {e['baseline']['ops_per_s']:,} | "
            f"{e['ratio']:.2f}x | {goal} |"
        )
    return "\n".join(lines)


def engine_table(result: dict) -> str:
    lines = [
        "| batch | cache alloc/free ops/s | take/free ops/s | locked list | list | deque | "
        "alloc/free vs locked list | alloc/free vs list | take/free vs deque | goal (vs locked list) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(e: dict, key: str) -> str:
        r = e[key]
        return f"{r['median']:.2f}x ({r['min']:.2f} to {r['max']:.2f})"

    for e in result["engine_paths"].values():
        goal = 1.0 if e["batch"] >= 16 else 0.7
        met = "met" if e["cache alloc/free / locked list"]["median"] >= goal else "not met"
        lines.append(
            f"| {e['batch']} | {e['cache alloc/free']['ops_per_s']:,} | {e['cache take/free']['ops_per_s']:,} | "
            f"{e['locked list']['ops_per_s']:,} | {e['list']['ops_per_s']:,} | {e['deque']['ops_per_s']:,} | "
            f"{ratio(e, 'cache alloc/free / locked list')} | {ratio(e, 'cache alloc/free / list')} | "
            f"{ratio(e, 'cache take/free / deque')} | >= {goal:.1f}x, {met} |"
        )
    return "\n".join(lines)


def update_readme(result: dict) -> None:
    detail = f"Python {result['machine']['python']}, median of {result['repeats']} repetitions"
    text = f"{run_header(result['machine'], detail)}\n\n"
    if "engine_paths" in result:
        text += (
            "**Through the engine paths** (`ElasticKVCache.alloc`/`free`, and vLLM's way: its own queue picks "
            "the ids, then `take`/`free`), as allocated, against plain free lists in the same chunks "
            "(median ratio, lowest to highest over repetitions):\n\n" + engine_table(result) + "\n\n"
        )
    if "batches" in result:
        text += (
            "**The bare `BlockAllocator`** (its own mutex, no cache around it) against the list free list "
            "(no lock):\n\n" + table(result) + "\n"
        )
    replace_readme_section("bench_allocator", text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the timed operations per repetition")
    parser.add_argument("--workloads", default=",".join(STEPS), help=f"comma-separated, of: {', '.join(STEPS)}")
    parser.add_argument("--engine-only", action="store_true", help="only the engine paths (cache alloc/free, take)")
    parser.add_argument("--impl", type=Path, help="benchmark the BlockAllocator of this file instead (e.g. an old one)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_allocator.json")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the table in benchmarks/README.md")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    workloads = args.workloads.split(",")
    if unknown := set(workloads) - set(STEPS):
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")

    result: dict = {
        "benchmark": "bench_allocator",
        "machine": machine(),
        "impl": str(args.impl) if args.impl else "kvmem.block_allocator",
        "geometry": {
            "layers": LAYERS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "dtype_bytes": DTYPE_BYTES,
            "block_tokens": BLOCK_TOKENS,
            "block_bytes": BLOCK_BYTES,
            "page_bytes": PAGE_BYTES,
            "blocks_per_slot": BLOCKS_PER_SLOT,
            "mapped_slots": SLOTS,
            "occupancy": OCCUPANCY,
        },
        "operation": "alloc(n) plus one free of n blocks",
        "repeats": args.repeats,
    }
    if not args.engine_only:
        result["batches"] = bench(load_allocator_class(args.impl), args.repeats, args.scale, workloads)
    result["engine_paths"] = bench_engine_paths(args.repeats, args.scale)
    result["load_at_end"] = load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "batches" in result:
        print(table(result))
    print(engine_table(result))
    print(f"wrote {args.out}")
    if args.update_readme:
        update_readme(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
