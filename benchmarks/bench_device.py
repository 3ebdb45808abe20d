"""Per-call latency of the device layer's primitives, on HostDevice and on CudaDevice.

Without a GPU, CudaDevice runs on the fake driver (tests/fakecuda): its figures measure kvmem's
Python layer, the cuda-bindings call path and the fake's host-memory work, not a GPU. Each
primitive is timed call by call (p50/p99 in microseconds) and, for CudaDevice, the driver calls
each kvmem operation makes are counted by the driver itself. Ratios are taken within one run:
CudaDevice against HostDevice for the same primitive, and one set-access call for a run of 16
pages against one call per page.

    python benchmarks/bench_device.py [--iterations N] [--device host,cuda] [--out FILE]
        [--update-readme]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, percentile, replace_readme_section, run_header  # noqa: E402

RUN_OF_PAGES = 16
COPY_BYTES = 2 << 20


class Timer:
    """Times single calls and, on the fake driver, counts the driver calls they make."""

    def __init__(self, fake) -> None:
        self.fake = fake
        self.samples: dict[str, list[float]] = {}
        self.calls: dict[str, dict[str, float]] = {}

    def time(self, name: str, fn: Callable[[], object], per: int = 1) -> object:
        t0 = time.perf_counter_ns()
        out = fn()
        self.samples.setdefault(name, []).append((time.perf_counter_ns() - t0) / 1e3 / per)
        return out

    def start_counting(self) -> None:
        if self.fake is not None:
            self.fake.reset_call_counters()

    def stop_counting(self, name: str, operations: int) -> None:
        if self.fake is None:
            return
        counts = {k: v / operations for k, v in self.fake.counters().items() if not k.startswith("live.") and v}
        self.calls[name] = counts


def bench_backend(dev, iterations: int, fake) -> dict:
    g = dev.granularity
    timer = Timer(fake)
    reservation = dev.reserve(iterations * g)

    timer.start_counting()
    for _ in range(iterations):
        other = timer.time("reserve", lambda: dev.reserve(RUN_OF_PAGES * g))
        timer.time("free", other.close)
    timer.stop_counting("reserve+free", iterations)

    timer.start_counting()
    pages = [timer.time("create_page", dev.create_page) for _ in range(iterations)]
    timer.stop_counting("create_page", iterations)

    timer.start_counting()
    mappings = [timer.time("map", lambda i=i, p=p: dev.map(reservation, i * g, p)) for i, p in enumerate(pages)]
    timer.stop_counting("map", iterations)

    timer.start_counting()
    for i in range(iterations):
        timer.time("set_access, 1 page per call", lambda i=i: dev.set_access(reservation, i * g, g))
    timer.stop_counting("set_access, 1 page per call", iterations)

    runs = iterations // RUN_OF_PAGES
    timer.start_counting()
    for r in range(runs):
        offset, size = r * RUN_OF_PAGES * g, RUN_OF_PAGES * g
        timer.time(
            f"set_access, {RUN_OF_PAGES} pages per call (per page)",
            lambda o=offset, s=size: dev.set_access(reservation, o, s),
            per=RUN_OF_PAGES,
        )
    timer.stop_counting(f"set_access, {RUN_OF_PAGES} pages per call (per page)", runs * RUN_OF_PAGES)

    host = bytearray(COPY_BYTES)
    for i in range(iterations):
        address = mappings[i].address
        timer.time("memset 2 MiB", lambda a=address: dev.memset(a, 7, COPY_BYTES))
        timer.time("copy host->device 2 MiB", lambda a=address: dev.copy_host_to_device(a, host))
        timer.time("copy device->host 2 MiB", lambda a=address: dev.copy_device_to_host(host, a))
        if i:
            src = mappings[i - 1].address
            timer.time(
                "copy device->device 2 MiB", lambda a=address, s=src: dev.copy_device_to_device(a, s, COPY_BYTES)
            )
        timer.time("synchronize", dev.synchronize)

    timer.start_counting()
    exported = [timer.time("export", p.export) for p in pages]
    timer.stop_counting("export", iterations)
    timer.start_counting()
    imported = [timer.time("import", lambda e=e: dev.import_page(e.fd, g)) for e in exported]
    timer.stop_counting("import", iterations)
    for e in exported:
        e.close()
    for p in imported:
        p.close()

    dev.synchronize()  # nothing may touch the pages once they are unmapped
    timer.start_counting()
    for m in mappings:
        timer.time("unmap", m.close)
    timer.stop_counting("unmap", iterations)
    timer.start_counting()
    for p in pages:
        timer.time("release_page", p.close)
    timer.stop_counting("release_page", iterations)
    reservation.close()

    return {
        "primitives": {
            name: {"p50_us": round(percentile(s, 0.5), 2), "p99_us": round(percentile(s, 0.99), 2), "n": len(s)}
            for name, s in timer.samples.items()
        },
        "driver_calls_per_operation": timer.calls,
    }


def table(result: dict) -> str:
    backends = list(result["backends"])
    names = list(next(iter(result["backends"].values()))["primitives"])
    head = "| primitive | " + " | ".join(f"{b} p50 µs | {b} p99 µs" for b in backends)
    if "cuda_over_host" in result["ratios"]:
        head += " | cuda/host p50"
    lines = [head + " |", "|" + "---|" * (1 + 2 * len(backends) + ("cuda_over_host" in result["ratios"]))]
    for name in names:
        cells = []
        for b in backends:
            p = result["backends"][b]["primitives"][name]
            cells += [f"{p['p50_us']:.1f}", f"{p['p99_us']:.1f}"]
        if "cuda_over_host" in result["ratios"]:
            cells.append(f"{result['ratios']['cuda_over_host'][name]:.2f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_readme(result: dict) -> None:
    detail = f"Python {result['machine']['python']}, {result['iterations']} iterations"
    block = run_header(result["machine"], detail) + "\n\n" + table(result) + "\n\n"
    for name, ratio in result["ratios"].items():
        if name != "cuda_over_host":
            block += f"- `{name}`: {ratio}\n"
    replace_readme_section("bench_device", block)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=256)
    parser.add_argument("--device", default="host,cuda", help="comma-separated: host, cuda")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_device.json")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the table in benchmarks/README.md")
    args = parser.parse_args()
    if args.iterations < RUN_OF_PAGES or args.iterations % RUN_OF_PAGES:
        parser.error(f"--iterations must be a positive multiple of {RUN_OF_PAGES}")
    kinds = args.device.split(",")

    fake = None
    if "cuda" in kinds and os.environ.get("KVMEM_BENCH_REAL_CUDA") != "1":
        # No GPU here (or asked not to use it): load the fake driver before the first driver call.
        # Large enough for every page the benchmark holds at once, with room to spare.
        os.environ.setdefault("FAKECUDA_CAPACITY_BYTES", str(4 * args.iterations * (2 << 20)))
        from tests import fakecuda

        fake = fakecuda.load()

    from kvmem.device import HostDevice
    from kvmem.device.cuda import CudaDevice

    result: dict = {"benchmark": "bench_device", "iterations": args.iterations, "machine": machine(), "backends": {}}
    for kind in kinds:
        dev = HostDevice() if kind == "host" else CudaDevice(0)
        label = "cuda (fake driver)" if kind == "cuda" and fake is not None else kind
        with dev:
            dev.reserve(dev.granularity).close()  # warm-up: first-call costs out of the samples
            result["backends"][label] = bench_backend(dev, args.iterations, fake if kind == "cuda" else None)

    ratios: dict = {}
    labels = list(result["backends"])
    if len(labels) == 2:
        host, cuda = (result["backends"][x]["primitives"] for x in labels)
        ratios["cuda_over_host"] = {k: round(cuda[k]["p50_us"] / host[k]["p50_us"], 2) for k in host}
    for label in labels:
        prims = result["backends"][label]["primitives"]
        batched = prims[f"set_access, {RUN_OF_PAGES} pages per call (per page)"]["p50_us"]
        single = prims["set_access, 1 page per call"]["p50_us"]
        ratios[f"{label}: set_access per page, batched/single"] = round(batched / single, 3)
    result["ratios"] = ratios

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    for name, ratio in ratios.items():
        if name != "cuda_over_host":
            print(f"{name}: {ratio}")
    if fake is not None:
        calls = result["backends"]["cuda (fake driver)"]["driver_calls_per_operation"]
        print("driver calls per operation:", json.dumps(calls, indent=1))
    print(f"wrote {args.out}")
    if args.update_readme:
        update_readme(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
