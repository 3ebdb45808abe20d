"""Page creation at daemon start: the daemon's pool filling its reserve with pages made in parallel.

In this process, on HostDevice and on CudaDevice (the fake driver without a GPU), a `kvmemd.pool.PagePool`
is started with a reserve of PAGES pages and timed until every one is created, mapped, given access
and (where the driver does not promise zeros) zeroed: with one creation thread (the former code) and
with the default `CREATE_THREADS`, interleaved (1, default, 1, default, ...), the load average recorded
with each pair. The fake driver counts the calls. On the host device the kernel zeroes each page in
posix_fallocate, which threads do in parallel; the fake driver's cuMemCreate allocates its memory the
same way (the driver commits memory at creation), in parallel too, but the pool's memset of each page
after it (the first write to the page's 4 KiB pages, each a fault) stays serial, so the gain is
smaller there. On a GPU the gain depends on how far the driver serializes cuMemCreate internally, which no
public figure says: the modeled bound below assumes none (creations spread over the threads).

    python benchmarks/bench_pool_create.py [--pages N] [--repeats N] [--out FILE] [--update-readme]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import load, machine, replace_readme_section, run_header, spread  # noqa: E402


def fill_seconds(device, pages: int, threads: int) -> float:
    from kvmemd.pool import PagePool

    ready = threading.Event()
    t0 = time.perf_counter()
    pool = PagePool(
        device, device.granularity, pages, pages, pages, release_after=600, notify=ready.set, create_threads=threads
    )
    try:
        while pool.stats().created < pages:
            ready.wait(timeout=0.01)
            ready.clear()
        return time.perf_counter() - t0
    finally:
        pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=256, help="Pages in the reserve (default: 256 = 512 MiB).")
    parser.add_argument("--repeats", type=int, default=5, help="Interleaved pairs per device (default: 5).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_pool_create.json")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    fake = None
    if os.environ.get("KVMEM_BENCH_REAL_CUDA") != "1":
        os.environ.setdefault("FAKECUDA_CAPACITY_BYTES", str(2 * args.pages * (2 << 20)))
        from tests import fakecuda

        fake = fakecuda.load()
    from benchmarks import costs
    from kvmem.device import HostDevice
    from kvmem.device.cuda import CudaDevice
    from kvmemd.pool import CREATE_THREADS

    result: dict = {
        "benchmark": "bench_pool_create",
        "machine": machine(),
        "pages": args.pages,
        "threads": CREATE_THREADS,
        "devices": {},
    }
    for kind in ("host", "cuda"):
        label = "cuda (fake driver)" if kind == "cuda" and fake is not None else kind
        with HostDevice() if kind == "host" else CudaDevice(0) as device:
            fill_seconds(device, 8, 1)  # warm-up
            pairs = []
            for _ in range(args.repeats):
                one = fill_seconds(device, args.pages, 1)
                if fake is not None and kind == "cuda":
                    fake.reset_call_counters()
                many = fill_seconds(device, args.pages, CREATE_THREADS)
                calls = {}
                if fake is not None and kind == "cuda":
                    counted = fake.counters()
                    calls = {k: counted[k] for k in ("cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemsetD8")}
                pairs.append({"one_thread_s": one, "threads_s": many, "speedup": one / many, "load": load()[0]})
            result["devices"][label] = {
                "pairs": pairs,
                "one_thread_ms": round(statistics.median(p["one_thread_s"] for p in pairs) * 1e3, 1),
                "threads_ms": round(statistics.median(p["threads_s"] for p in pairs) * 1e3, 1),
                "speedup": spread([p["speedup"] for p in pairs]),
                "load": spread([p["load"] for p in pairs]),
                "driver_calls_per_fill": calls,
            }
            print(label, json.dumps(result["devices"][label]["speedup"]), flush=True)
    published = costs.load()
    create_ms = args.pages * published.us["cuMemCreate"] / 1e3
    result["gpu_model"] = {
        "serial_create_ms": round(create_ms, 1),
        "parallel_create_ms_if_unserialized": round(create_ms / CREATE_THREADS, 1),
        "costs": published.source,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    print(text)
    if args.update_readme:
        replace_readme_section(
            "bench_pool_create", f"{run_header(result['machine'], f'{args.pages} pages')}\n\n{text}\n"
        )
    return 0


def table(result: dict) -> str:
    rows = [
        f"| device | 1 thread, ms | {result['threads']} threads, ms | speedup (median, lowest to highest) | load |",
        "|---|---|---|---|---|",
    ]
    for label, r in result["devices"].items():
        s = r["speedup"]
        rows.append(
            f"| {label} | {r['one_thread_ms']} | {r['threads_ms']} | {s['median']:.2f}x ({s['min']:.2f} to "
            f"{s['max']:.2f}) | {r['load']['min']:g} to {r['load']['max']:g} |"
        )
    model = result["gpu_model"]
    return "\n".join(
        [
            *rows,
            "",
            f"Modeled on a GPU ({result['pages']} cuMemCreate at {model['costs']}): {model['serial_create_ms']} ms "
            f"one after the other, {model['parallel_create_ms_if_unserialized']} ms on {result['threads']} threads "
            "if the driver serializes nothing (an upper bound on the gain: not measured).",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
