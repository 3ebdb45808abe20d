"""Sleep and wake with --offload: how fast a model's KV cache goes to the host tier and comes back.

On HostDevice, through a real kvmemd: an engine (this process) fills a KV cache of SIZE bytes with
data, then `ControlClient.sleep(offload=True)` is timed until the daemon's status says ASLEEP
(the engine unmapped every page, the daemon copied them all to its host tier and recycled them),
and `wake()` until the cache is usable again (pages granted, bytes copied back, mapped at the
same offsets, access set). A sample of blocks is checked to be bit-identical after the wake.

The baseline is a plain memcpy of the same bytes between two buffers whose every page was written
first (numpy `copyto` into a destination filled beforehand: not `np.zeros`, whose memory the
allocator hands back untouched, so that a copy into it pays a page fault per page and makes a weak
baseline). It is timed interleaved with the cycles, in the same process: memcpy, sleep, memcpy,
wake, memcpy, sleep, ... Each sleep and wake is divided by the memcpy just before it; the JSON
keeps every pair, the load average at each, and the median and spread. For context only: a memcpy
into fresh memory (what a first copy into a newly allocated host buffer pays in page faults), and,
interleaved too, the *page-copy ceiling*: the same bytes copied one 2 MiB page at a time between
host-device pages (memfds mapped with 4 KiB pages, as the daemon's) and the touched buffer, in
this process with no daemon (the fastest any page-granular copy here can be; see the README).
Goal: sleep and wake each at >= 0.5x the memcpy between touched buffers. The modeled GPU figure
(`costs.sleep_wake_model`) is printed beside it.

    python benchmarks/bench_sleep.py [--sizes 1GiB,8GiB] [--cycles N] [--out FILE] [--update-readme]

A size needs about 5x its bytes of free RAM (pages, tier, two baseline buffers, the ceiling's
pages); a size that does not fit is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import load, machine, publish, spread  # noqa: E402

# One layer per K and V of 4 KV heads x 128 dims, fp16, 16-token blocks: 16 KiB blocks, 128 per page.
GEOMETRY = {"num_layers": 4, "block_size": 16, "num_kv_heads": 4, "head_dim": 128, "dtype": "float16"}
POLL_S = 0.0005
CHUNK = 64 << 20  # the engine fills its cache with random bytes this many at a time


class Memcpy:
    """The baseline: a copy of `size` bytes between two buffers whose every page is already written."""

    def __init__(self, size: int):
        self.src = np.full(size, 7, dtype=np.uint8)
        self.dst = np.empty(size, dtype=np.uint8)
        self.dst.fill(1)  # write every page: the copies below pay no page fault

    def seconds(self) -> float:
        t0 = time.perf_counter()
        np.copyto(self.dst, self.src)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.src = self.dst = None


class PageCopy:
    """The page-copy ceiling: `size` bytes between host-device pages and `dst`, one page per copy,
    with the primitive the daemon's host tier uses (`copy_*_many`), in this process, one thread."""

    def __init__(self, size: int, dst: np.ndarray):
        from kvmem.device import HostDevice

        self.device = HostDevice()
        self.page = self.device.granularity
        self.reservation = self.device.reserve(size)
        for i in range(size // self.page):
            self.device.map(self.reservation, i * self.page, self.device.create_page())
        self.device.set_access(self.reservation, 0, size)
        self.device.memset(self.reservation.address, 7, size)
        self.dst = dst

    def seconds(self, to_device: bool) -> float:
        base, page = self.reservation.address, self.page
        pieces = [(base + i, self.dst[i : i + page]) for i in range(0, self.dst.size, page)]
        t0 = time.perf_counter()
        if to_device:
            self.device.copy_host_to_device_many(pieces)
        else:
            self.device.copy_device_to_host_many([(host, address) for address, host in pieces])
        return time.perf_counter() - t0

    def close(self) -> None:
        self.device.close()


def memcpy_fresh_seconds(size: int) -> float:
    """A copy into a new anonymous mapping, as the kernel hands it out: it faults every page in (context only)."""
    src = np.full(size, 7, dtype=np.uint8)
    region = mmap.mmap(-1, size)
    t0 = time.perf_counter()
    np.copyto(np.frombuffer(region, dtype=np.uint8), src)
    elapsed = time.perf_counter() - t0
    region.close()
    return elapsed


def sleep_and_wake(size: int, runtime_dir: Path, cycles: int) -> dict:
    import kvmem
    from kvmem.control import ControlClient
    from tests.daemon_support import DaemonProcess, wait_for

    budget = size + (256 << 20)
    with (
        DaemonProcess(
            runtime_dir, "host", str(budget), "--host-tier", str(size + (256 << 20)), "--reserve", "0", "0"
        ) as daemon,
        kvmem.connect("sleeper", runtime_dir=runtime_dir) as session,
        ControlClient(runtime_dir=runtime_dir, timeout=600) as control,
    ):
        session.on_sleep(lambda offload: None)  # the drain hook: this benchmark runs no work of its own
        cache = session.kv_cache(
            **GEOMETRY, max_tokens=2 * size // 1024, low_watermark=0, high_watermark=0, grow_wait=300
        )
        per_block = 2 * GEOMETRY["num_layers"] * cache.block_bytes
        blocks = cache.alloc(size // per_block)
        import torch

        chunk = torch.randint(0, 256, (CHUNK,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        for layer in range(GEOMETRY["num_layers"]):
            for tensors in (cache.k, cache.v):
                data = tensors[layer][: len(blocks)].view(-1).view(torch.uint8)
                for i, start in enumerate(range(0, data.numel(), CHUNK)):
                    piece = data[start : start + CHUNK]
                    piece.copy_(chunk[: piece.numel()])
                    piece[0] = (i + layer) % 256  # no two chunks alike
        sample = blocks[:: max(1, len(blocks) // 64)]
        before = {b: bytes(cache.device.read(cache.block_address(0, "v", b), cache.block_bytes)) for b in sample}
        mapped = cache.stats().mapped_bytes
        wait_for(lambda: daemon.status().model("sleeper").used_pages * daemon.status().daemon.page_size == mapped)

        memcpy = Memcpy(mapped)
        memcpy.seconds()  # warm-up
        ceiling = PageCopy(mapped, memcpy.dst)
        ceiling.seconds(to_device=False)  # warm-up: the page tables of both sides filled
        pairs = []
        # The first sleep fills a cold tier; the next ones reuse its warm memory. Each sleep and
        # wake comes right after a memcpy of the same bytes (and the page-copy ceiling): A B A B,
        # under the same load.
        for _ in range(cycles):
            copy_before_sleep = memcpy.seconds()
            pages_before_sleep = ceiling.seconds(to_device=False)
            load_sleep = load()[0]
            t0 = time.perf_counter()
            control.sleep("sleeper", offload=True)
            while daemon.status().model("sleeper").state.name != "ASLEEP":
                time.sleep(POLL_S)
            sleep_s = time.perf_counter() - t0
            saved = daemon.status().model("sleeper").saved_pages * daemon.status().daemon.page_size
            copy_before_wake = memcpy.seconds()
            pages_before_wake = ceiling.seconds(to_device=True)
            load_wake = load()[0]
            t0 = time.perf_counter()
            control.wake("sleeper")
            while cache.asleep:
                time.sleep(POLL_S)
            wake_s = time.perf_counter() - t0
            after = {b: bytes(cache.device.read(cache.block_address(0, "v", b), cache.block_bytes)) for b in sample}
            if after != before or saved != mapped:
                raise SystemExit("bench_sleep: the cache did not come back bit-identical")
            pairs.append(
                {
                    "memcpy_before_sleep_s": copy_before_sleep,
                    "sleep_s": sleep_s,
                    "sleep_vs_memcpy": copy_before_sleep / sleep_s,
                    "page_copy_before_sleep_s": pages_before_sleep,
                    "page_copy_vs_memcpy_sleep": copy_before_sleep / pages_before_sleep,
                    "load_at_sleep": load_sleep,
                    "memcpy_before_wake_s": copy_before_wake,
                    "wake_s": wake_s,
                    "wake_vs_memcpy": copy_before_wake / wake_s,
                    "page_copy_before_wake_s": pages_before_wake,
                    "page_copy_vs_memcpy_wake": copy_before_wake / pages_before_wake,
                    "load_at_wake": load_wake,
                }
            )
        memcpy.close()
        ceiling.close()
        return {"bytes": mapped, "cycles": pairs}


def policy_latency(rounds: int = 200) -> dict:
    """From `kvctl limit` (ControlClient.set_limit) to the engine's client holding the new policy."""
    import kvmem
    from kvmem.control import ControlClient
    from tests.daemon_support import DaemonProcess

    samples = []
    with tempfile.TemporaryDirectory(prefix="kvmem-bench-policy-") as tmp:
        runtime = Path(tmp) / "rt"
        with (
            DaemonProcess(runtime, "host", "64MiB") as _,
            kvmem.connect("limited", runtime_dir=runtime) as session,
            ControlClient(runtime_dir=runtime) as control,
        ):
            client = session.source
            page = client.page_size
            for i in range(rounds):
                pages = 1 + i % 16
                t0 = time.perf_counter()
                control.set_limit("limited", pages * page)
                while client.policy.limit_pages != pages:
                    time.sleep(0)
                samples.append(time.perf_counter() - t0)
    samples.sort()
    return {
        "rounds": rounds,
        "p50_ms": samples[len(samples) // 2] * 1e3,
        "p99_ms": samples[int(len(samples) * 0.99)] * 1e3,
        "max_ms": samples[-1] * 1e3,
    }


def run_size(size: int, cycles: int) -> dict:
    available = psutil.virtual_memory().available
    if available < 5 * size:
        return {"size": size, "skipped": f"needs ~{5 * size / 2**30:.1f} GiB free, {available / 2**30:.1f} available"}
    fresh = min(memcpy_fresh_seconds(size) for _ in range(2))
    with tempfile.TemporaryDirectory(prefix="kvmem-bench-sleep-") as tmp:
        kv = sleep_and_wake(size, Path(tmp) / "rt", cycles)
    pairs = kv["cycles"]
    summary = {"cold": pairs[0]}
    warm = pairs[1:]
    if warm:
        summary["warm"] = {
            "sleep_s": statistics.median(p["sleep_s"] for p in warm),
            "wake_s": statistics.median(p["wake_s"] for p in warm),
            "memcpy_s": statistics.median(
                p[k] for p in warm for k in ("memcpy_before_sleep_s", "memcpy_before_wake_s")
            ),
            "sleep_vs_memcpy": spread([p["sleep_vs_memcpy"] for p in warm]),
            "wake_vs_memcpy": spread([p["wake_vs_memcpy"] for p in warm]),
            "page_copy_vs_memcpy": spread(
                [p[k] for p in warm for k in ("page_copy_vs_memcpy_sleep", "page_copy_vs_memcpy_wake")]
            ),
            "load": spread([p[k] for p in warm for k in ("load_at_sleep", "load_at_wake")]),
        }
    return {"size": size, **kv, **summary, "memcpy_fresh_s": fresh}


def table(result: dict) -> str:
    rows = [
        "| size | tier | sleep --offload | wake | sleep/memcpy | wake/memcpy | page-copy ceiling/memcpy | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    latency = result["policy_latency"]
    for r in result["runs"]:
        gib = r["size"] / 2**30
        if "skipped" in r:
            rows.append(f"| {gib:g} GiB | | skipped: {r['skipped']} | | | | | |")
            continue

        def rate(seconds: float, size: int = r["bytes"]) -> str:
            return f"{seconds * 1e3:.0f} ms ({size / seconds / 2**30:.1f} GiB/s)"

        def ratio(s: dict) -> str:
            return f"{s['median']:.2f}x ({s['min']:.2f} to {s['max']:.2f})"

        cold = r["cold"]
        cold_ceiling = (cold["page_copy_vs_memcpy_sleep"] + cold["page_copy_vs_memcpy_wake"]) / 2
        rows.append(
            f"| {gib:g} GiB | cold (first sleep) | {rate(cold['sleep_s'])} | {rate(cold['wake_s'])} | "
            f"{cold['sleep_vs_memcpy']:.2f}x | {cold['wake_vs_memcpy']:.2f}x | {cold_ceiling:.2f}x | "
            f"{cold['load_at_sleep']:g} |"
        )
        if "warm" in r:
            w = r["warm"]
            rows.append(
                f"| {gib:g} GiB | warm (median of {len(r['cycles']) - 1}) | {rate(w['sleep_s'])} | "
                f"{rate(w['wake_s'])} | {ratio(w['sleep_vs_memcpy'])} | {ratio(w['wake_vs_memcpy'])} | "
                f"{ratio(w['page_copy_vs_memcpy'])} | {w['load']['min']:g} to {w['load']['max']:g} |"
            )
            notes.append(
                f"{gib:g} GiB: memcpy between touched buffers, interleaved, median {rate(w['memcpy_s'])}; "
                f"into a new mapping (context) {rate(r['memcpy_fresh_s'])}."
            )
    model = result["gpu_model"]
    return "\n".join(
        [
            *rows,
            "",
            *notes,
            "",
            "Goal: sleep and wake each >= 0.5x the memcpy between touched buffers (each sleep or wake divided "
            "by the memcpy timed just before it; median, lowest to highest). *cold*: the first sleep, whose host "
            "tier memory is new; *warm*: the next ones, reusing the tier memory the wake freed. *page-copy "
            "ceiling*: the same bytes copied a 2 MiB page at a time between host-device pages and the touched "
            "buffer, interleaved too, in this process with no daemon: the most a page-granular copy reaches here.",
            "",
            f"Modeled on a GPU ({model['pages']} pages of 2 MiB, 16-page batches; per-call costs: {model['costs']}; "
            f"copy bandwidth: {model['copy_bandwidth']}): sleep {model['sleep_ms']} ms, "
            f"{model['sleep_vs_pinned_copy']:.2f}x the bare pinned copy (one stage after the other: "
            f"{model['sleep_serial_ms']} ms); wake {model['wake_ms']} ms, {model['wake_vs_pinned_copy']:.2f}x "
            f"(serial: {model['wake_serial_ms']} ms). Imports and messages are not modeled.",
            "",
            f"`kvctl limit` to the engine holding the new limit ({latency['rounds']} changes): p50 "
            f"{latency['p50_ms']:.2f} ms, p99 {latency['p99_ms']:.2f} ms, max {latency['max_ms']:.2f} ms "
            "(goal: within 100 ms).",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1GiB,8GiB", help="Comma-separated sizes (default: 1GiB,8GiB).")
    parser.add_argument("--cycles", type=int, default=4, help="Sleep/wake cycles per size (default: 4).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_sleep.json")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    from kvmem.common.sizes import parse_size

    sizes = [parse_size(text) for text in args.sizes.split(",")]
    result = {"benchmark": "bench_sleep", "machine": machine(), "geometry": GEOMETRY, "runs": []}
    from benchmarks import costs
    from kvmemd.host_tier import BATCH_PAGES

    pages = 512  # 1 GiB of 2 MiB pages
    result["gpu_model"] = costs.sleep_wake_model(
        pages, 2 << 20, BATCH_PAGES, 2 * GEOMETRY["num_layers"], costs.load(), costs.load_copy_bandwidth()
    )
    result["policy_latency"] = policy_latency()
    print(json.dumps(result["policy_latency"]), flush=True)
    for size in sizes:
        result["runs"].append(run_size(size, args.cycles))
        print(json.dumps(result["runs"][-1]), flush=True)
    result["load_at_end"] = load()
    publish(result, args.out, table(result), "HostDevice" if args.update_readme else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
