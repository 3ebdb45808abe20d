"""Sleep and wake with --offload: how fast a model's KV cache goes to the host tier and comes back.

On HostDevice, through a real kvmemd: an engine (this process) fills a KV cache of SIZE bytes with
data, then `ControlClient.sleep(offload=True)` is timed until the daemon's status says ASLEEP
(the engine unmapped every page, the daemon copied them all to its host tier and recycled them),
and `wake()` until the cache is usable again (pages granted, bytes copied back, mapped at the
same offsets, access set). A sample of blocks is checked to be bit-identical after the wake.

The baseline, in the same run, is a plain memcpy of the same bytes between two buffers that are
already faulted in (numpy `copyto`: the fastest copy this machine does), and for context a memcpy
into fresh memory (what a first copy into a newly allocated host buffer pays in page faults).
Goal: sleep and wake each at >= 0.5x the plain memcpy bandwidth.

    python benchmarks/bench_sleep.py [--sizes 1GiB,8GiB] [--out FILE] [--update-readme]

A size needs about 2.5x its bytes of free RAM (pages, tier, baseline buffers); a size that does
not fit is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import mmap
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, replace_readme_section, run_header  # noqa: E402

# One layer per K and V of 4 KV heads x 128 dims, fp16, 16-token blocks: 16 KiB blocks, 128 per page.
GEOMETRY = {"num_layers": 4, "block_size": 16, "num_kv_heads": 4, "head_dim": 128, "dtype": "float16"}
POLL_S = 0.0005
CHUNK = 64 << 20  # the engine fills its cache with random bytes this many at a time


def memcpy_seconds(size: int, fresh_destination: bool) -> float:
    src = np.full(size, 7, dtype=np.uint8)
    if fresh_destination:
        # A new anonymous mapping, as the kernel hands it out: the copy faults every page in.
        # (Not np.empty: the allocator may hand back memory an earlier buffer already touched.)
        region = mmap.mmap(-1, size)
        t0 = time.perf_counter()
        np.copyto(np.frombuffer(region, dtype=np.uint8), src)
        elapsed = time.perf_counter() - t0
        region.close()
        return elapsed
    dst = np.zeros(size, dtype=np.uint8)
    t0 = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - t0


def sleep_and_wake(size: int, runtime_dir: Path) -> dict:
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

        cycles = []
        for _ in range(2):  # the first sleep fills a cold tier; the second reuses its warm memory
            t0 = time.perf_counter()
            control.sleep("sleeper", offload=True)
            while daemon.status().model("sleeper").state.name != "ASLEEP":
                time.sleep(POLL_S)
            sleep_s = time.perf_counter() - t0
            saved = daemon.status().model("sleeper").saved_pages * daemon.status().daemon.page_size
            t0 = time.perf_counter()
            control.wake("sleeper")
            while cache.asleep:
                time.sleep(POLL_S)
            wake_s = time.perf_counter() - t0
            after = {b: bytes(cache.device.read(cache.block_address(0, "v", b), cache.block_bytes)) for b in sample}
            if after != before or saved != mapped:
                raise SystemExit("bench_sleep: the cache did not come back bit-identical")
            cycles.append({"sleep_s": sleep_s, "wake_s": wake_s})
        return {"bytes": mapped, "cold": cycles[0], "warm": cycles[1]}


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


def run_size(size: int) -> dict:
    available = psutil.virtual_memory().available
    if available < 2.5 * size:
        return {"size": size, "skipped": f"needs ~{2.5 * size / 2**30:.1f} GiB free, {available / 2**30:.1f} available"}
    plain = min(memcpy_seconds(size, fresh_destination=False) for _ in range(3))
    fresh = min(memcpy_seconds(size, fresh_destination=True) for _ in range(2))
    with tempfile.TemporaryDirectory(prefix="kvmem-bench-sleep-") as tmp:
        kv = sleep_and_wake(size, Path(tmp) / "rt")
    for cycle in (kv["cold"], kv["warm"]):
        cycle["sleep_vs_memcpy"] = plain / cycle["sleep_s"]
        cycle["wake_vs_memcpy"] = plain / cycle["wake_s"]
    return {"size": size, **kv, "memcpy_s": plain, "memcpy_fresh_s": fresh}


def table(result: dict) -> str:
    rows = [
        "| size | tier | sleep --offload | wake | sleep/memcpy | wake/memcpy |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    latency = result["policy_latency"]
    for r in result["runs"]:
        gib = r["size"] / 2**30
        if "skipped" in r:
            rows.append(f"| {gib:g} GiB | | skipped: {r['skipped']} | | | |")
            continue

        def rate(seconds: float, size: int = r["bytes"]) -> str:
            return f"{seconds * 1e3:.0f} ms ({size / seconds / 2**30:.1f} GiB/s)"

        for name in ("cold", "warm"):
            c = r[name]
            rows.append(
                f"| {gib:g} GiB | {name} | {rate(c['sleep_s'])} | {rate(c['wake_s'])} | "
                f"{c['sleep_vs_memcpy']:.2f}x | {c['wake_vs_memcpy']:.2f}x |"
            )
        notes.append(
            f"{gib:g} GiB baselines: memcpy between touched buffers {rate(r['memcpy_s'])}; into a new "
            f"mapping {rate(r['memcpy_fresh_s'])}."
        )
    return "\n".join(
        [
            *rows,
            "",
            *notes,
            "",
            "Goal: sleep and wake each >= 0.5x the memcpy between touched buffers. *cold*: the first sleep, "
            "whose host tier memory is new; *warm*: the next one, reusing the tier memory the wake freed.",
            "",
            f"`kvctl limit` to the engine holding the new limit ({latency['rounds']} changes): p50 "
            f"{latency['p50_ms']:.2f} ms, p99 {latency['p99_ms']:.2f} ms, max {latency['max_ms']:.2f} ms "
            "(goal: within 100 ms).",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1GiB,8GiB", help="Comma-separated sizes (default: 1GiB,8GiB).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_sleep.json")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    from kvmem.common.sizes import parse_size

    sizes = [parse_size(text) for text in args.sizes.split(",")]
    result = {"benchmark": "bench_sleep", "machine": machine(), "geometry": GEOMETRY, "runs": []}
    result["policy_latency"] = policy_latency()
    print(json.dumps(result["policy_latency"]), flush=True)
    for size in sizes:
        result["runs"].append(run_size(size))
        print(json.dumps(result["runs"][-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    if args.update_readme:
        replace_readme_section("bench_sleep", f"{run_header(result['machine'], 'HostDevice')}\n\n{table(result)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
