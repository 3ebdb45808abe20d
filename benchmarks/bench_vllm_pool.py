"""vLLM's block pool on kvmem: what growing costs per GiB on the path `vllm serve` takes.

With kvmem, vLLM's scheduler grows the KV cache through `KvmemBlockPool`
(kvmem/integrations/vllm/pool.py): for each request it admits, a demand hint (`prepare`) maps the
slots of the blocks the request will take, then `get_new_blocks` hands them out. The cache's own
background growth is off there (the pool maps what it hands out), so this is the growth engines
really get, not `bench_kv_cache.py`'s `alloc` path.

The pool is driven here as vLLM's scheduler drives it, without a model (vLLM's CPU build runs no
model fast enough to make a burst): requests of 1-64 blocks admitted in scheduler steps, each step's
requests one after another, then the step's modeled compute (`bench_kv_cache.arrivals_steps`: vLLM
0.32's 8192-token steps, their compute modeled from their FLOPs on an H100), until 2 GiB are in
use. The cache is the Llama-3-8B-like geometry of `bench_kv_cache.py` (a slot: 64 blocks, 64 pages),
from a daemon at its default settings on the fake CUDA driver, which counts the calls in this
process. Model A grows on fresh pages (a cold start), then B on the pages A gave back (the steady
state), each model's first request once the daemon has made the first burst it keeps for a
starting engine, as in `bench_kv_cache.py`.

Two pools, interleaved (kvmem, former, kvmem, former, each with its own daemon): kvmem's, whose
hint maps with a request's slots those of the blocks queued next that the measured demand fills
(from pages the daemon has free), and the former one, labelled, whose hint maps only the request's
own slots (`KvmemBlockPool._ahead` made to name none, as the pool was before commit `41003ba`).

    .venv-vllm/bin/python benchmarks/bench_vllm_pool.py [--repeats N] [--out FILE] [--update-readme]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_kv_cache import (  # noqa: E402
    GEOMETRY,
    GIB_BLOCKS,
    after_a_heartbeat,
    arrivals_steps,
    wait_for_first_burst,
)
from benchmarks.common import load, machine, publish  # noqa: E402

GIB = 2  # GiB in use at the end of each model's phase
RETRY_S = 0.005  # how soon a request the pool could not back is scheduled again (vLLM's engine loop)


def grow_through_the_pool(fake, daemon, model: str, seed: int) -> dict:
    """One model's phase: a pool over a fresh cache, requests in scheduler steps until `GIB` GiB are
    in use, the first once the daemon has made the reserve it keeps for a starting engine (as before
    `vllm serve`'s first request: `bench_kv_cache.wait_for_first_burst`); the driver calls, growths
    and waits it took. Every block is freed at the end."""
    import kvmem
    from kvmem.integrations.vllm import allocation
    from kvmem.integrations.vllm import pool as kvmem_pool

    rng = random.Random(seed)
    blocks_wanted = GIB * GIB_BLOCKS
    with kvmem.connect(model, runtime_dir=daemon.runtime_dir) as session:
        cache = session.kv_cache(**GEOMETRY, max_tokens=4 * blocks_wanted * 16)
        kvmem_pool.set_backing(lambda n: cache)
        try:
            pool = kvmem_pool.KvmemBlockPool(cache.max_blocks, enable_caching=False, hash_block_size=16)
        finally:
            kvmem_pool.set_backing(allocation.cache_for_pool)
        waited_for_reserve = wait_for_first_burst(daemon, cache)
        fake.reset_call_counters()
        grows_before = cache.stats().grows
        waits, taken = [], []
        t_start = time.perf_counter()
        for n, pause in arrivals_steps(rng, blocks_wanted):
            t0 = time.perf_counter()
            pool.prepare(n)  # vLLM's demand hint, then the count and the blocks (KVCacheManager.allocate_slots)
            while pool.get_num_free_blocks() < n:
                # Short (the daemon is still making pages): vLLM leaves the request waiting and tries
                # again at its next schedule, here every RETRY_S.
                time.sleep(RETRY_S)
                pool.prepare(n)
            taken += pool.get_new_blocks(n)
            waits.append(time.perf_counter() - t0)
            if pause:
                time.sleep(pause)
        wall = time.perf_counter() - t_start
        client = fake.counters()
        stats = cache.stats()
        mapped_gib = stats.pages_held / 512
        pool.free_blocks(taken)
        waits.sort()
        return {
            "set_access_per_gib": round(client.get("cuMemSetAccess", 0) / mapped_gib, 1),
            "map_per_gib": round(client.get("cuMemMap", 0) / mapped_gib, 1),
            "growths": stats.grows - grows_before,
            "mapped_slots": stats.mapped_slots,
            "requests": len(waits),
            "requests_waiting_over_10ms": sum(w > 0.01 for w in waits),
            "request_wait_max_ms": round(waits[-1] * 1e3, 2),
            "request_wait_median_ms": round(statistics.median(waits) * 1e3, 3),
            "wall_s": round(wall, 3),
            "waited_for_reserve_s": round(waited_for_reserve, 3),
        }


def run_pair(fake, former: bool, seed: int) -> dict:
    """Models A then B on one daemon at its default settings; `former`: the pool names no slot ahead."""
    from kvmem.integrations.vllm import pool as kvmem_pool
    from tests.daemon_support import DaemonProcess

    stock_ahead = kvmem_pool.KvmemBlockPool._ahead
    if former:
        kvmem_pool.KvmemBlockPool._ahead = lambda self, queued, num_blocks, growing: []
    try:
        with tempfile.TemporaryDirectory(prefix="kvmem-bench-") as tmp:
            runtime_dir = Path(tmp) / "rt"
            with DaemonProcess(runtime_dir, "cuda", f"{2 * GIB + 1}GiB") as daemon:
                time.sleep(0.5)  # the reserve fills as it would before the first engine arrives
                phases = {"load": load()[0]}
                for model in ("a", "b"):
                    if model == "b":  # A's pages back and zeroed ahead, as in bench_kv_cache.py
                        t0 = time.perf_counter()
                        while time.perf_counter() - t0 < 60 and (
                            (h := daemon.status().daemon).pages_free_dirty or h.pages_free < h.pages_created
                        ):
                            time.sleep(0.01)
                    after_a_heartbeat(daemon)
                    phases[model] = grow_through_the_pool(fake, daemon, model, seed)
                return phases
    finally:
        kvmem_pool.KvmemBlockPool._ahead = stock_ahead


def table(result: dict) -> str:
    runs = result["runs"]

    def cells(variant: str, model: str, key: str) -> str:
        return ", ".join(str(run[variant][model][key]) for run in runs)

    rows = [
        ("cuMemSetAccess per GiB mapped (kvcached: 512)", "set_access_per_gib"),
        ("growths", "growths"),
        ("slots mapped", "mapped_slots"),
        ("requests waiting > 10 ms", "requests_waiting_over_10ms"),
        ("request wait, max ms", "request_wait_max_ms"),
    ]
    lines = [
        f"Requests of 1-64 blocks in vLLM's 8192-token scheduler steps until {GIB} GiB are in use "
        f"({runs[0]['kvmem']['a']['requests']} requests), each run's figures in order, runs interleaved:",
        "",
        "| per GiB of KV, vLLM's block pool | kvmem: model A (fresh pages) | kvmem: model B (pages from A) "
        "| former pool: A | former pool: B |",
        "|---|---|---|---|---|",
    ]
    for label, key in rows:
        lines.append(
            f"| {label} | {cells('kvmem', 'a', key)} | {cells('kvmem', 'b', key)} | "
            f"{cells('former', 'a', key)} | {cells('former', 'b', key)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_vllm_pool.json")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("bench_vllm_pool needs vLLM: run it with .venv-vllm/bin/python (make test-vllm makes it)")
        return 1
    from tests import fakecuda

    os.environ.setdefault("FAKECUDA_CAPACITY_BYTES", str((2 * GIB + 2) << 30))
    fake = fakecuda.load()
    os.environ.update(fakecuda.child_env())  # the daemon loads it too
    runs = []
    for i in range(args.repeats):
        runs.append({"kvmem": run_pair(fake, former=False, seed=i), "former": run_pair(fake, former=True, seed=i)})
    result = {"benchmark": "bench_vllm_pool", "machine": machine(), "geometry": GEOMETRY, "gib": GIB, "runs": runs}
    result["load_at_end"] = load()
    detail = f"{args.repeats} runs of each pool, interleaved"
    publish(result, args.out, table(result), detail if args.update_readme else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
