"""What the CUDA driver's VMM calls cost on this GPU, and what growing kvmem's KV cache costs per GiB.

1. Per call, timed one by one through `cuda.bindings.driver` (p50/p99 in µs over `--pages` samples,
   2 MiB pages; the binding's own Python cost, about a microsecond, is included): cuMemCreate,
   cuMemMap, cuMemSetAccess on one page and on runs of 8 and 64 freshly mapped pages (one call each, at
   least 64 samples), cuMemUnmap, cuMemRelease, cuMemExportToShareableHandle and
   cuMemImportFromShareableHandle (a POSIX fd; imported in this process), and cuMemHostAlloc and
   cuMemFreeHost of one page of page-locked host memory (a host tier chunk).
2. Host <-> device copy bandwidth from page-locked host memory (cuMemHostAlloc) into mapped pages.
3. Growing a kvmem cache by 1 GiB with the Llama-3-8B geometry (32 layers, 8 KV heads, head dim 128,
   float16, blocks of 16: 512 pages, 64 ranges of 8 pages): measured with pages made in-process
   (`kvmem.local`) and with pages from a `kvmemd` whose warm reserve holds them (imports), each beside
   the time modeled from the per-call p50s of part 1 with kvmem's calls, and kvcached's scheme (one
   cuMemCreate, cuMemMap and cuMemSetAccess per page, no handle reuse) modeled from the same figures.

With --fake-driver it runs on tests/fakecuda (host memory): the figures then say nothing about a GPU
and the JSON says so ("fake_driver": true); benchmarks/costs.py refuses such a file.

    python benchmarks/bench_driver.py [--pages N] [--copy-mib N] [--fake-driver] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import costs as call_costs  # noqa: E402
from benchmarks.common import machine, percentile  # noqa: E402

GEOMETRY = {"num_layers": 32, "block_size": 16, "num_kv_heads": 8, "head_dim": 128, "dtype": "float16"}
GIB_BLOCKS = 8 * 64  # 1 GiB of KV = 8 slots of 64 blocks (one 2 MiB page per layer's K and V per slot)
SET_ACCESS_RUNS = (8, 64)


class Driver:
    """The primary context of GPU 0 and the properties kvmem's CudaDevice uses (kvmem/device/cuda.py)."""

    def __init__(self) -> None:
        from cuda.bindings import driver as cu

        from kvmem.device.cuda import check

        self.cu, self.check = cu, check
        check("cuInit", cu.cuInit(0))
        self.dev = check("cuDeviceGet", cu.cuDeviceGet(0))
        self.name = check("cuDeviceGetName", cu.cuDeviceGetName(256, self.dev)).split(b"\0", 1)[0].decode()
        self.ctx = check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(self.dev))
        check("cuCtxSetCurrent", cu.cuCtxSetCurrent(self.ctx))
        self.prop = cu.CUmemAllocationProp()
        self.prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self.prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self.prop.location.id = 0
        self.handle_type = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        self.prop.requestedHandleTypes = self.handle_type
        flags = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        self.page = int(check("cuMemGetAllocationGranularity", cu.cuMemGetAllocationGranularity(self.prop, flags)))
        self.access = cu.CUmemAccessDesc()
        self.access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self.access.location.id = 0
        self.access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE

    def close(self) -> None:
        self.check("cuDevicePrimaryCtxRelease", self.cu.cuDevicePrimaryCtxRelease(self.dev))


def timed(d: Driver, samples: dict[str, list[float]], name: str, fn: Callable[[], tuple]) -> object:
    """Run one driver call, check it, and add its time in µs to `samples[name]` ("call" or "call[detail]")."""
    t0 = time.perf_counter_ns()
    returned = fn()
    samples.setdefault(name, []).append((time.perf_counter_ns() - t0) / 1e3)
    return d.check(name.split("[")[0], returned)


def per_call_costs(d: Driver, pages: int) -> dict[str, list[float]]:
    cu, g = d.cu, d.page
    samples: dict[str, list[float]] = {}
    base = int(d.check("cuMemAddressReserve", cu.cuMemAddressReserve(pages * g, g, 0, 0)))
    try:
        handles = [timed(d, samples, "cuMemCreate", lambda: cu.cuMemCreate(g, d.prop, 0)) for _ in range(pages)]
        for i, h in enumerate(handles):
            timed(d, samples, "cuMemMap", lambda i=i, h=h: cu.cuMemMap(base + i * g, g, 0, h, 0))
        for i in range(pages):
            timed(d, samples, "cuMemSetAccess", lambda i=i: cu.cuMemSetAccess(base + i * g, g, [d.access], 1))
        for run in [r for r in SET_ACCESS_RUNS if r <= pages]:  # freshly mapped pages, as a grow sets them
            for _ in range(-(-64 * run // pages)):
                for i, h in enumerate(handles):
                    d.check("cuMemUnmap", cu.cuMemUnmap(base + i * g, g))
                    d.check("cuMemMap", cu.cuMemMap(base + i * g, g, 0, h, 0))
                for start in range(0, pages - run + 1, run):
                    timed(
                        d,
                        samples,
                        f"cuMemSetAccess[{run} pages]",
                        lambda start=start, run=run: cu.cuMemSetAccess(base + start * g, run * g, [d.access], 1),
                    )
        for i in range(pages):
            timed(d, samples, "cuMemUnmap", lambda i=i: cu.cuMemUnmap(base + i * g, g))
        for h in handles:
            fd = int(
                timed(
                    d,
                    samples,
                    "cuMemExportToShareableHandle",
                    lambda h=h: cu.cuMemExportToShareableHandle(h, d.handle_type, 0),
                )
            )
            imported = timed(
                d,
                samples,
                "cuMemImportFromShareableHandle",
                lambda fd=fd: cu.cuMemImportFromShareableHandle(fd, d.handle_type),
            )
            os.close(fd)
            d.check("cuMemRelease", cu.cuMemRelease(imported))
        for h in handles:
            timed(d, samples, "cuMemRelease", lambda h=h: cu.cuMemRelease(h))
        # One host tier chunk (kvmemd/host_tier.py): page-locked host memory of one page, made and
        # freed on the tier's copy workers during an offloading sleep.
        chunks = [
            int(timed(d, samples, "cuMemHostAlloc[1 page]", lambda: cu.cuMemHostAlloc(g, 0))) for _ in range(pages)
        ]
        for chunk in chunks:
            timed(d, samples, "cuMemFreeHost[1 page]", lambda chunk=chunk: cu.cuMemFreeHost(chunk))
    finally:
        d.check("cuMemAddressFree", cu.cuMemAddressFree(base, pages * g))
    return samples


def copy_bandwidth(d: Driver, size: int, runs: int) -> dict[str, float]:
    """GB/s of cuMemcpyHtoD and cuMemcpyDtoH of `size` bytes between pinned host memory and mapped pages."""
    cu, g = d.cu, d.page
    pages = -(-size // g)
    base = int(d.check("cuMemAddressReserve", cu.cuMemAddressReserve(pages * g, g, 0, 0)))
    handles = [d.check("cuMemCreate", cu.cuMemCreate(g, d.prop, 0)) for _ in range(pages)]
    host = int(d.check("cuMemHostAlloc", cu.cuMemHostAlloc(size, 0)))
    try:
        for i, h in enumerate(handles):
            d.check("cuMemMap", cu.cuMemMap(base + i * g, g, 0, h, 0))
        d.check("cuMemSetAccess", cu.cuMemSetAccess(base, pages * g, [d.access], 1))
        out = {}
        for name, call, fn in (
            ("host_to_device_gb_s", "cuMemcpyHtoD", lambda: cu.cuMemcpyHtoD(base, host, size)),
            ("device_to_host_gb_s", "cuMemcpyDtoH", lambda: cu.cuMemcpyDtoH(host, base, size)),
        ):
            d.check(call, fn())  # warm-up
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                d.check(call, fn())
                d.check("cuCtxSynchronize", cu.cuCtxSynchronize())
                times.append(time.perf_counter() - t0)
            out[name] = round(size / percentile(times, 0.5) / 1e9, 2)
        d.check("cuMemUnmap", cu.cuMemUnmap(base, pages * g))
    finally:
        d.check("cuMemFreeHost", cu.cuMemFreeHost(host))
        for h in handles:
            d.check("cuMemRelease", cu.cuMemRelease(h))
        d.check("cuMemAddressFree", cu.cuMemAddressFree(base, pages * g))
    return {"bytes": size, "runs": runs, **out}


def grow_local(repeats: int, fake) -> tuple[list[float], dict[str, int] | None]:
    """Seconds to grow a fresh local cache by 1 GiB (pages made in this process), `repeats` times; on the
    fake driver also the driver calls one grow made, counted by the driver (the model's counts, checked)."""
    import kvmem

    times, calls = [], None
    for _ in range(repeats):
        with kvmem.local(device="cuda", budget="2GiB") as session:
            cache = session.kv_cache(**GEOMETRY, max_tokens=2 * GIB_BLOCKS * 16, background=False)
            if fake is not None:
                fake.reset_call_counters()
            t0 = time.perf_counter()
            ids = cache.alloc(GIB_BLOCKS)
            times.append(time.perf_counter() - t0)
            if fake is not None:
                counted = fake.counters()
                calls = {name: counted[name] for name in ("cuMemCreate", "cuMemMap", "cuMemSetAccess")}
            cache.free(ids)
    return times, calls


def grow_from_daemon(repeats: int) -> list[float]:
    """Seconds to grow by 1 GiB with pages from a kvmemd whose warm reserve holds them (no cuMemCreate)."""
    import kvmem
    from tests.daemon_support import DaemonProcess, wait_for

    times = []
    with tempfile.TemporaryDirectory(prefix="kvmem-bench-") as tmp:
        runtime_dir = Path(tmp) / "rt"
        with DaemonProcess(runtime_dir, "cuda", "3GiB", "--reserve", "1", "600", "--release-after", "600") as daemon:
            for _ in range(repeats):
                wait_for(lambda: daemon.status().daemon.pages_free_clean >= 600, timeout=120, what="a warm reserve")
                with kvmem.connect("bench", runtime_dir=runtime_dir) as session:
                    cache = session.kv_cache(**GEOMETRY, max_tokens=2 * GIB_BLOCKS * 16, background=False)
                    t0 = time.perf_counter()
                    ids = cache.alloc(GIB_BLOCKS)
                    times.append(time.perf_counter() - t0)
                    cache.free(ids)
    return times


def grow_model(costs: call_costs.CallCosts, page_bytes: int) -> dict:
    """Driver calls per GiB for kvmem (local pages, daemon pages) and kvcached, and their modeled ms."""
    pages = (1 << 30) // page_bytes
    ranges = 2 * GEOMETRY["num_layers"]
    run = pages // ranges  # one set-access per range covers the slots of one grow
    mapped = {"cuMemMap": pages, "cuMemSetAccess": ranges}
    local = {"cuMemCreate": pages, **mapped}
    daemon = {"cuMemImportFromShareableHandle": pages, **mapped}
    kvcached = call_costs.kvcached_calls(pages)
    return {
        "calls_per_gib": {"kvmem_local": local, "kvmem_daemon": daemon, "kvcached": kvcached},
        "set_access_pages_per_call": run,
        "modeled_ms_per_gib": {
            "kvmem_local": round(call_costs.modeled_ms(local, costs, run), 2),
            "kvmem_daemon": round(call_costs.modeled_ms(daemon, costs, run), 2),
            "kvcached": round(call_costs.modeled_ms(kvcached, costs), 2),
        },
    }


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(samples, 0.5), 2), "p99": round(percentile(samples, 0.99), 2), "n": len(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=512, help="2 MiB pages (samples) for the per-call figures")
    parser.add_argument("--copy-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="1 GiB grows of each kind")
    parser.add_argument("--fake-driver", action="store_true", help="run on tests/fakecuda (not a GPU)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_driver.json")
    args = parser.parse_args()
    if args.fake_driver:
        from tests import fakecuda

        os.environ.setdefault("FAKECUDA_CAPACITY_BYTES", str(8 << 30))
        fake = fakecuda.load()
        os.environ.update(fakecuda.child_env())  # the daemon loads it too
    else:
        fake = None
        os.environ["KVMEM_TEST_DRIVER"] = "real"  # tests.daemon_support: the daemon on the real driver

    d = Driver()
    try:
        samples = per_call_costs(d, args.pages)
        copies = copy_bandwidth(d, args.copy_mib << 20, runs=10)
        name, page_bytes = d.name, d.page
    finally:
        d.close()
    per_call = {call: summary(s) for call, s in samples.items()}
    measured = call_costs.CallCosts({k: v["p50"] for k, v in per_call.items()}, "measured in this run", True)
    (local, counted), daemon = grow_local(args.repeats, fake), grow_from_daemon(args.repeats)
    model = grow_model(measured, page_bytes)
    result = {
        "benchmark": "bench_driver",
        "fake_driver": args.fake_driver,
        "label": "fake driver, not a GPU" if args.fake_driver else name,
        "gpu": name,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "page_bytes": page_bytes,
        "per_call_us": per_call,
        "copy_pinned": copies,
        "grow_per_gib": {
            "geometry": GEOMETRY,
            "measured_ms_p50": {
                "kvmem_local": round(percentile(local, 0.5) * 1e3, 2),
                "kvmem_daemon": round(percentile(daemon, 0.5) * 1e3, 2),
            },
            "repeats": args.repeats,
            **model,
            **({"kvmem_local_calls_counted_by_the_fake": counted} if fake is not None else {}),
            "modeled_with_published_a100_ms_per_gib": grow_model(call_costs.load_published(), page_bytes)[
                "modeled_ms_per_gib"
            ],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for call, figures in per_call.items():
        print(f"{call:40} p50 {figures['p50']:9.2f} µs  p99 {figures['p99']:9.2f} µs  (n={figures['n']})")
    print(f"pinned copies: {copies}")
    print(f"grow 1 GiB: {json.dumps(result['grow_per_gib']['measured_ms_p50'])} ms measured, modeled {model}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
