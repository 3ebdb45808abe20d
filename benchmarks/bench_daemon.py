"""Grant round trip through kvmemd against mapping the same pages in-process, in one run.

For 1, 16 and 256 pages, each sample times a full grant: the GROW request, the daemon taking
pages from its warm reserve and sending their descriptors, the client importing them, mapping
them into its reservation and setting access (one call for the run) so they are usable. The
baseline maps the same number of pages the process already holds (warm pages, no IPC) and sets
access the same way: what an in-process allocator that keeps its pages would do. Pages are
unmapped and returned between samples (untimed).

Also measured, interleaved with the same samples: the bare-Python floor of this exchange, a
request and a reply carrying the same number of memfds between two Python processes over a
SOCK_SEQPACKET socketpair, the receiver checking each descriptor with fstat as a client must (no
daemon logic, no accounting, no objects). Whatever a Python daemon and client do, they pay at least
that; its ratio, (floor + in-process map) / in-process map, says what this machine allows.

And: page creations on the grant path while the reserve is warm (the daemon's count of pages it
created while a GROW waited, on both devices), and the daemon's CPU use while 8 client processes
cycle grants and returns.

    python benchmarks/bench_daemon.py [--device host,cuda] [--samples N] [--out FILE] [--update-readme]
"""

from __future__ import annotations

import argparse
import array
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, percentile, replace_readme_section, run_header  # noqa: E402

SIZES = (1, 16, 256)
CYCLER = """
import sys, time
from kvmem.client import DaemonClient
client = DaemonClient(sys.argv[2], runtime_dir=sys.argv[1])
dev = client.device
reservation = dev.reserve(64 * client.page_size)
deadline = time.monotonic() + float(sys.argv[3])
cycles = 0
while time.monotonic() < deadline:
    pages = client.acquire(8, wait=1.0).pages
    maps = [dev.map(reservation, i * client.page_size, p.physical) for i, p in enumerate(pages)]
    if pages:
        dev.set_access(reservation, 0, len(pages) * client.page_size)
    dev.synchronize()
    for m in maps:
        m.close()
    client.release(pages)
    cycles += 1
print(cycles)
client.close()
"""


# The floor's server: on each (req, n) request, n of its memfds in batches of at most 253 (SCM_MAX_FD).
FLOOR_SERVER = """
import array, os, socket, struct, sys
sock = socket.socket(fileno=int(sys.argv[1]))
page_size, count = int(sys.argv[2]), int(sys.argv[3])
fds = []
for _ in range(count):
    fd = os.memfd_create("kvmem-floor", os.MFD_CLOEXEC)
    os.ftruncate(fd, page_size)
    fds.append(fd)
while data := sock.recv(16):
    req, n = struct.unpack("!II", data)
    for start in range(0, n, 253):
        batch = fds[start : min(n, start + 253)]
        done = int(start + len(batch) == n)
        body = struct.pack(f"!II{len(batch)}I", req, done, *range(start, start + len(batch)))
        sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch).tobytes())])
"""
_FLOOR_CMSG = socket.CMSG_SPACE(253 * 4)


def floor_round_trip(sock: socket.socket, n: int, page_size: int) -> tuple[float, list[int]]:
    """One bare exchange: microseconds, and the received descriptors (closed by the caller, untimed)."""
    received: list[int] = []
    t0 = time.perf_counter_ns()
    sock.send(struct.pack("!II", 1, n))
    done = False
    while not done:
        data, ancdata, _, _ = sock.recvmsg(65536, _FLOOR_CMSG)
        done = bool(struct.unpack_from("!II", data)[1])
        for _, _, payload in ancdata:
            fds = array.array("i", payload[: len(payload) - len(payload) % 4])
            for fd in fds:
                if os.fstat(fd).st_size != page_size:
                    raise RuntimeError("the floor's server sent a descriptor of the wrong size")
            received.extend(fds)
    return (time.perf_counter_ns() - t0) / 1e3, received


def map_run(dev, reservation, physicals, page_size):
    mappings = [dev.map(reservation, i * page_size, p) for i, p in enumerate(physicals)]
    dev.set_access(reservation, 0, len(physicals) * page_size)
    return mappings


def bench_device_kind(kind: str, samples: int, cycle_seconds: float) -> dict:
    from kvmem.client import DaemonClient
    from tests.daemon_support import DaemonProcess, wait_for

    out: dict = {"grant_round_trip": {}, "in_process_map": {}, "ratio_p50": {}, "python_floor": {}}
    with tempfile.TemporaryDirectory(prefix="kvmem-bench-") as tmp:
        runtime_dir = Path(tmp) / "rt"
        # A reserve filled once at start (600 pages) and never refilled during the run (low = 1):
        # any page creation counted while timing would be a creation on the grant path.
        reserve = ("--reserve", "1", "600", "--release-after", "600")
        # At the daemon's default log level (the test harness asks for debug, which logs every
        # return and is not what a deployed daemon does).
        with DaemonProcess(runtime_dir, kind, "2GiB", *reserve, "--log-level", "info") as daemon:
            wait_for(lambda: daemon.status().daemon.pages_free_clean >= 600, timeout=120, what="a warm reserve")
            client = DaemonClient("bench", runtime_dir=runtime_dir)
            dev, page = client.device, client.page_size
            reservation = dev.reserve(max(SIZES) * page)
            held = client.acquire(max(SIZES)).pages  # warm pages for the in-process baseline
            # Creations while a GROW waited (the daemon's own count): the reserve's background refill,
            # which a 256-page GROW now triggers (kvmemd.pool: the reserve follows recent GROWs), is
            # not on the grant path and is not counted.
            creates_before = daemon.status().daemon.pages_created_for_requests_total
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            floor_server = subprocess.Popen(
                [sys.executable, "-c", FLOOR_SERVER, str(theirs.fileno()), str(page), str(max(SIZES))],
                pass_fds=[theirs.fileno()],
            )
            theirs.close()
            for n in SIZES:
                ipc, local, floor, floor_ratio = [], [], [], []
                for _ in range(samples):
                    t0 = time.perf_counter_ns()
                    result = client.acquire(n, wait=10)
                    mappings = map_run(dev, reservation, [p.physical for p in result.pages], page)
                    ipc.append((time.perf_counter_ns() - t0) / 1e3)
                    assert len(result.pages) == n, result
                    dev.synchronize()
                    for m in mappings:
                        m.close()
                    client.release(result.pages)

                    t0 = time.perf_counter_ns()
                    mappings = map_run(dev, reservation, [p.physical for p in held[:n]], page)
                    local.append((time.perf_counter_ns() - t0) / 1e3)
                    dev.synchronize()
                    for m in mappings:
                        m.close()

                    micros, fds = floor_round_trip(ours, n, page)
                    floor.append(micros)
                    floor_ratio.append((micros + local[-1]) / local[-1])
                    for fd in fds:
                        os.close(fd)
                key = f"{n} pages"
                out["grant_round_trip"][key] = {"p50_us": percentile(ipc, 0.5), "p99_us": percentile(ipc, 0.99)}
                out["in_process_map"][key] = {"p50_us": percentile(local, 0.5), "p99_us": percentile(local, 0.99)}
                out["ratio_p50"][key] = round(percentile(ipc, 0.5) / percentile(local, 0.5), 2)
                out["python_floor"][key] = {
                    "p50_us": percentile(floor, 0.5),
                    "ratio_p50": round(percentile(floor_ratio, 0.5), 2),
                }
            ours.close()  # the floor's server reads the close and exits
            floor_server.wait(timeout=60)
            time.sleep(0.6)  # pool counters are published at the next heartbeat (0.5 s)
            out["page_creations_on_grant_path"] = (
                daemon.status().daemon.pages_created_for_requests_total - creates_before
            )
            client.release(list(client.pages.values()))
            client.close()
            reservation.close()

            # 8 clients cycling grants and returns: the daemon's CPU time over the wall time.
            proc = psutil.Process(daemon.pid)
            cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
            cyclers = [
                subprocess.Popen(
                    [sys.executable, "-c", CYCLER, str(runtime_dir), f"cycler{i}", str(cycle_seconds)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for i in range(8)
            ]
            cycles = [int(c.communicate(timeout=cycle_seconds + 120)[0] or 0) for c in cyclers]
            wall = time.monotonic() - t0
            out["eight_clients"] = {
                "daemon_cores": round((sum(proc.cpu_times()[:2]) - cpu0) / wall, 3),
                "grants_per_s": round(sum(cycles) / wall, 1),
                "seconds": round(wall, 2),
            }
    return out


def table(result: dict) -> str:
    lines = [
        "| device | pages | grant round trip p50 / p99 µs | in-process map p50 / p99 µs | ratio (p50) "
        "| bare-Python floor p50 µs | floor ratio (p50) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, data in result["devices"].items():
        for key in data["grant_round_trip"]:
            g, m, f = data["grant_round_trip"][key], data["in_process_map"][key], data["python_floor"][key]
            lines.append(
                f"| {kind} | {key.split()[0]} | {g['p50_us']:.0f} / {g['p99_us']:.0f} | "
                f"{m['p50_us']:.0f} / {m['p99_us']:.0f} | {data['ratio_p50'][key]:.2f}x | "
                f"{f['p50_us']:.0f} | {f['ratio_p50']:.2f}x |"
            )
    lines.append("")
    for kind, data in result["devices"].items():
        e = data["eight_clients"]
        line = (
            f"- {kind}: 8 clients cycling 8-page grants: daemon at {e['daemon_cores']:.2f} cores, "
            f"{e['grants_per_s']:.0f} grants/s"
        )
        if "page_creations_on_grant_path" in data:
            line += f"; page creations on the grant path with a warm reserve: {data['page_creations_on_grant_path']}"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="host,cuda")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--cycle-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_daemon.json")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    # The daemon and the clients find the fake driver through LD_LIBRARY_PATH (no GPU here).
    from tests import fakecuda

    fakecuda.build()
    os.environ.update(fakecuda.child_env(FAKECUDA_CAPACITY_BYTES=str(4 << 30)))
    if "LD_LIBRARY_PATH" not in os.environ.get("KVMEM_BENCH_REEXEC", ""):
        # This process must itself load the fake at start: re-exec with the environment set.
        os.environ["KVMEM_BENCH_REEXEC"] = "LD_LIBRARY_PATH"
        os.execv(sys.executable, [sys.executable, *sys.argv])

    result = {"benchmark": "bench_daemon", "samples": args.samples, "machine": machine(), "devices": {}}
    for kind in args.device.split(","):
        label = "cuda (fake driver)" if kind == "cuda" else kind
        result["devices"][label] = bench_device_kind(kind, args.samples, args.cycle_seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    if args.update_readme:
        detail = f"{args.samples} samples per size"
        replace_readme_section("bench_daemon", f"{run_header(result['machine'], detail)}\n\n{table(result)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
