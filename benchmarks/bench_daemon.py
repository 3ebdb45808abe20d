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

Against an earlier commit (`--against`, by default the grant path as the performance issue found
it), on the host device, interleaved (theirs, ours, theirs, ours...): the daemon's CPU time per
grant-and-return with 8 clients cycling 8-page grants, and kvmem's own latency above the bare
exchange for 16 pages (a client's `acquire` without mapping, less the bare-Python floor's exchange
of 16 descriptors measured in the same repetition). Each side runs its own daemon and clients from
its own tree (`git archive` of the commit into a temporary directory); the floor server's own CPU
per exchange is reported beside them: what Python itself costs for the send half of a grant, with
no event loop, no decoding checks, no accounting.

    python benchmarks/bench_daemon.py [--device host,cuda] [--samples N] [--against COMMIT|none]
                                      [--out FILE] [--update-readme]
"""

from __future__ import annotations

import argparse
import array
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, percentile, publish  # noqa: E402

SIZES = (1, 16, 256)
# The grant path as the performance issue (issue 15) measured it, before its work began.
ISSUE_BASELINE_COMMIT = "c2721e7"
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


# A client for either tree (before protocol 3 the calls were grow/return_pages): cycles grants of
# argv[4] pages, mapping them as an engine does, for argv[3] seconds; prints the cycles and the
# acquire calls' median in µs (the call alone: request, daemon, descriptors imported as pages).
COMPARED_CYCLER = """
import statistics, sys, time
from kvmem.client import DaemonClient
client = DaemonClient(sys.argv[2], runtime_dir=sys.argv[1])
acquire = getattr(client, "acquire", None) or client.grow
release = getattr(client, "release", None) or client.return_pages
dev, page, n = client.device, client.page_size, int(sys.argv[4])
reservation = dev.reserve(n * page)
deadline = time.monotonic() + float(sys.argv[3])
latencies = []
while time.monotonic() < deadline:
    t0 = time.perf_counter_ns()
    pages = acquire(n, wait=1.0).pages
    latencies.append((time.perf_counter_ns() - t0) / 1e3)
    assert len(pages) == n, len(pages)
    maps = [dev.map(reservation, i * page, p.physical) for i, p in enumerate(pages)]
    dev.set_access(reservation, 0, n * page)
    dev.synchronize()
    for m in maps:
        m.close()
    release(pages)
print(len(latencies), statistics.median(latencies))
client.close()
reservation.close()
"""


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


def run_tree(tree: Path, clients: int, pages: int, seconds: float) -> dict:
    """One daemon of `tree` (host device, a warm reserve never refilled during the run) and `clients`
    cyclers of `pages`-page grants for `seconds`: the daemon's CPU per grant-and-return, the acquire
    median (median over the clients) and the grants per second."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    with tempfile.TemporaryDirectory(prefix="kvmem-bench-") as tmp:
        runtime_dir = Path(tmp) / "rt"
        start = "import sys; from kvmemd.cli import main; sys.argv[0] = 'kvmemd'; main()"
        args = [
            sys.executable, "-c", start, "start", "--device", "host", "--budget", "2GiB", "--runtime-dir",
            str(runtime_dir), "--reserve", "1", "600", "--release-after", "600", "--log-level", "warning",
        ]  # fmt: skip
        daemon = subprocess.Popen(args, env=env, cwd=tree)
        try:
            proc = psutil.Process(daemon.pid)
            deadline = time.monotonic() + 120
            # Both trees' daemons name their socket gpu0.sock in the runtime directory; the reserve of
            # 600 pages is made at start (the daemon's CPU settles once it is).
            while not (runtime_dir / "gpu0.sock").exists() or proc.cpu_percent(interval=0.3) > 5:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon of {tree} did not start (exit {daemon.poll()})")
            cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
            cyclers = [
                subprocess.Popen(
                    [sys.executable, "-c", COMPARED_CYCLER, str(runtime_dir), f"c{i}", str(seconds), str(pages)],
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                    cwd=tree,
                )
                for i in range(clients)
            ]
            outs = [c.communicate(timeout=seconds + 120)[0].split() for c in cyclers]
            wall = time.monotonic() - t0
            cpu = sum(proc.cpu_times()[:2]) - cpu0
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    cycles = sum(int(out[0]) for out in outs)
    return {
        "daemon_cpu_us_per_grant_and_return": cpu / cycles * 1e6,
        "acquire_p50_us": statistics.median(float(out[1]) for out in outs),
        "grants_per_s": cycles / wall,
    }


def floor_exchanges(pages: int, count: int) -> dict:
    """`count` bare exchanges of `pages` descriptors: the median µs, and the server's CPU per exchange."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    page = 2 << 20
    server = subprocess.Popen(
        [sys.executable, "-c", FLOOR_SERVER, str(theirs.fileno()), str(page), str(pages)], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    proc = psutil.Process(server.pid)
    floor_round_trip(ours, pages, page)  # the server has made its memfds once this returns
    latencies = []
    cpu0 = sum(proc.cpu_times()[:2])
    for _ in range(count):
        micros, fds = floor_round_trip(ours, pages, page)
        latencies.append(micros)
        for fd in fds:
            os.close(fd)
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    ours.close()
    server.wait(timeout=60)
    return {"p50_us": statistics.median(latencies), "server_cpu_us_per_exchange": cpu / count * 1e6}


def bench_against(commit: str, repetitions: int, seconds: float) -> dict:
    """Ours against `commit`'s tree, interleaved (see the module docstring)."""
    sides: dict[str, dict[str, list[float]]] = {"theirs": {}, "ours": {}}
    floor: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kvmem-baseline-") as tmp:
        theirs = Path(tmp)
        archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(theirs)], input=archive, check=True)
        for _ in range(repetitions):
            f = floor_exchanges(16, 1000)
            for key, value in f.items():
                floor.setdefault(key, []).append(value)
            for side, tree in (("theirs", theirs), ("ours", REPO)):
                eight = run_tree(tree, clients=8, pages=8, seconds=seconds)
                one = run_tree(tree, clients=1, pages=16, seconds=seconds)
                figures = {
                    "daemon_cpu_us_per_grant_and_return (8 clients, 8 pages)": eight[
                        "daemon_cpu_us_per_grant_and_return"
                    ],
                    "grants_per_s (8 clients, 8 pages)": eight["grants_per_s"],
                    "daemon_cpu_us_per_grant_and_return (1 client, 16 pages)": one[
                        "daemon_cpu_us_per_grant_and_return"
                    ],
                    "acquire_p50_us (16 pages)": one["acquire_p50_us"],
                    "above_bare_exchange_us (16 pages)": one["acquire_p50_us"] - f["p50_us"],
                }
                for key, value in figures.items():
                    sides[side].setdefault(key, []).append(value)
    out = {"commit": commit, "repetitions": repetitions, "seconds_per_run": seconds, "floor_16_pages": {}}
    for key, values in floor.items():
        out["floor_16_pages"][key] = round(statistics.median(values), 1)
    for key in sides["ours"]:
        ours, theirs_ = statistics.median(sides["ours"][key]), statistics.median(sides["theirs"][key])
        ratios = sorted(o / t for o, t in zip(sides["ours"][key], sides["theirs"][key], strict=True))
        out[key] = {
            "ours": round(ours, 1),
            "theirs": round(theirs_, 1),
            "ratio": round(ours / theirs_, 2),
            "ratio_spread": [round(ratios[0], 2), round(ratios[-1], 2)],
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
    against = result.get("against")
    if against:
        lines += [
            "",
            f"Against commit `{against['commit']}` (host device, {against['repetitions']} interleaved repetitions "
            f"of {against['seconds_per_run']:.0f} s each; medians, ours/theirs with its spread over the repetitions):",
            "",
            "| figure | ours | theirs | ratio (spread) |",
            "|---|---|---|---|",
        ]
        for key, value in against.items():
            if isinstance(value, dict) and "ratio" in value:
                lines.append(
                    f"| {key} | {value['ours']:.0f} | {value['theirs']:.0f} | {value['ratio']:.2f}x "
                    f"({value['ratio_spread'][0]:.2f} to {value['ratio_spread'][1]:.2f}) |"
                )
        floor = against["floor_16_pages"]
        lines.append(
            f"\nThe bare-Python floor for 16 descriptors in the same runs: {floor['p50_us']:.0f} µs per exchange, its "
            f"server at {floor['server_cpu_us_per_exchange']:.0f} µs of CPU per exchange (the send half only)."
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="host,cuda")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--cycle-seconds", type=float, default=5.0)
    parser.add_argument(
        "--against", default=ISSUE_BASELINE_COMMIT, help="Commit to compare the grant path with (none: skip)."
    )
    parser.add_argument("--repetitions", type=int, default=3, help="Interleaved repetitions against --against.")
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
    if args.against != "none":
        result["against"] = bench_against(args.against, args.repetitions, args.cycle_seconds)
    detail = f"{args.samples} samples per size"
    publish(result, args.out, table(result), detail if args.update_readme else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
