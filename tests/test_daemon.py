"""kvmemd end to end: a real daemon process, real engine processes, real fds, real shared memory.

Every test runs on the host device and on the fake CUDA driver.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from kvmem.common.errors import ControlError
from kvmem.common.status import ModelState
from kvmem.control import ControlClient
from tests.daemon_support import KVMEMD, DaemonProcess, EngineProcess, cleanup_shm, shm_exists, wait_for
from tests.support import GrowthClock

MiB = 1 << 20
PAGE = 2 * MiB


@pytest.fixture(params=["host", "cuda"])
def device_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Path:
    return tmp_path / "rt"


def model_status(daemon: DaemonProcess, name: str):
    return daemon.status().model(name)


def test_grant_and_return(device_kind: str, runtime_dir: Path):
    with DaemonProcess(runtime_dir, device_kind, "64MiB") as daemon, EngineProcess(runtime_dir, "llama") as engine:
        got = engine.call("grow", 5)
        assert got["granted"] == 5 and got["denied"] is None
        assert len(set(got["ids"])) == 5
        assert engine.call("map") == {"mapped": 5}
        status = wait_for(lambda: (s := model_status(daemon, "llama")) and s.mapped_pages == 5 and s, what="status")
        assert status.state == ModelState.AWAKE and status.pid == engine.pid
        assert daemon.status().daemon.pages_granted == 5
        returned = engine.call("return", 3)["returned"]
        assert len(returned) == 3 and set(returned) <= set(got["ids"])
        wait_for(lambda: model_status(daemon, "llama").mapped_pages == 2, what="2 pages held")
        header = daemon.status().daemon
        assert header.pages_granted == 2
        assert header.pages_created <= header.budget_pages == 32
        assert engine.exit() == 0
        wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="pages back after exit")


def test_limit_denies_and_lowering_it_asks_pages_back(device_kind: str, runtime_dir: Path):
    """A lowered limit is one message: POLICY, whose target is the limit; no RECLAIM comes with it."""
    with (
        DaemonProcess(runtime_dir, device_kind, "64MiB") as daemon,
        EngineProcess(runtime_dir, "qwen") as engine,
        ControlClient(runtime_dir=runtime_dir) as control,
    ):
        control.set_limit("qwen", 8 * MiB)  # 4 pages
        got = engine.call("grow", 6)
        assert got["granted"] == 4 and got["denied"] == "limit"
        assert engine.call("grow", 1, 0)["denied"] == "limit"
        control.set_limit("qwen", 2 * MiB)
        policy = ["target", 1]  # POLICY: limit 1 page, so a target of 1 page

        def policy_seen() -> list | None:
            events = engine.call("events")["events"]
            return events if policy in events else None

        wait_for(policy_seen, what="the lowered limit's POLICY")
        status = wait_for(lambda: (s := model_status(daemon, "qwen")).limit_pages == 1 and s, what="status")
        assert status.target_pages == 1 and status.mapped_pages == 4
        engine.call("return", 3)
        wait_for(lambda: model_status(daemon, "qwen").mapped_pages == 1, what="settled at the limit")
        assert model_status(daemon, "qwen").target_pages == -1
        # A RECLAIM sent with the POLICY would have been read by now: none was sent.
        assert [e for e in engine.call("events")["events"] if e[0] == "reclaim"] == []
        control.set_limit("qwen", None)
        assert engine.call("grow", 3)["granted"] == 3


def test_budget_and_limits_hold_under_16_concurrent_clients(device_kind: str, runtime_dir: Path):
    """16 engine processes grow and return at random; a watcher checks every status snapshot."""
    budget_pages = 24
    with DaemonProcess(runtime_dir, device_kind, f"{budget_pages * 2}MiB", "--reserve", "2", "6") as daemon:
        limits = {f"m{i}": (3 if i % 2 else None) for i in range(16)}
        with ControlClient(runtime_dir=runtime_dir) as control:
            for name, limit in limits.items():
                if limit is not None:
                    control.set_limit(name, limit * PAGE)
        violations: list[str] = []
        stop = threading.Event()
        snapshots = 0

        def watch() -> None:
            nonlocal snapshots
            while not stop.is_set():
                status = daemon.status()
                snapshots += 1
                head = status.daemon
                if head.pages_created > budget_pages:
                    violations.append(f"{head.pages_created} pages created, budget {budget_pages}")
                if sum(m.mapped_pages for m in status.models) != head.pages_granted:
                    violations.append("per-model pages do not add up to the pages granted")
                for m in status.models:
                    if limits.get(m.model) is not None and m.mapped_pages > limits[m.model]:
                        violations.append(f"{m.model} holds {m.mapped_pages} > limit {limits[m.model]}")

        watcher = threading.Thread(target=watch)
        watcher.start()
        engines = [EngineProcess(runtime_dir, name) for name in limits]
        try:
            for i, engine in enumerate(engines):
                engine.send("hammer", 40, i)
            results = [engine._reply() for engine in engines]
        finally:
            stop.set()
            watcher.join()
            codes = [engine.exit() for engine in engines]
        assert codes == [0] * 16
        assert violations == []
        assert snapshots > 10
        assert sum(r["granted"] for r in results) > budget_pages  # pages really went round
        wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="all pages back")
        head = daemon.status().daemon
        assert head.pages_free == head.pages_created <= budget_pages


def test_client_killed_mid_grant_gives_every_page_back(device_kind: str, runtime_dir: Path):
    with DaemonProcess(runtime_dir, device_kind, "256MiB", "--reserve", "0", "0") as daemon:
        victim = EngineProcess(runtime_dir, "victim")
        assert victim.call("grow", 10)["granted"] == 10
        victim.send("grow", 100, 30)  # the pool creates pages as it goes: the grant takes a while
        wait_for(lambda: daemon.status().daemon.pages_created > 10, what="grant under way")
        victim.kill()
        wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="pages back after SIGKILL")
        assert model_status(daemon, "victim").state == ModelState.DETACHED
        with EngineProcess(runtime_dir, "survivor") as survivor:  # the daemon still serves
            assert survivor.call("grow", 100)["granted"] == 100
            assert survivor.exit() == 0
        wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="the survivor's pages back")
        head = daemon.status().daemon
        assert head.pages_free == head.pages_created <= head.budget_pages  # no page lost


def test_pages_are_zeroed_before_they_change_tenant(device_kind: str, runtime_dir: Path):
    # A budget of 4 pages: whatever B gets was A's, and held A's bytes.
    with (
        DaemonProcess(runtime_dir, device_kind, "8MiB", "--reserve", "0", "0") as daemon,
        EngineProcess(runtime_dir, "tenant-a") as a,
        EngineProcess(runtime_dir, "tenant-b") as b,
    ):
        got_a = a.call("grow", 4)
        assert got_a["granted"] == 4
        a.call("map")
        a.call("write", 0xAB)
        a.call("return", "all")
        got_b = b.call("grow", 4)
        assert sorted(got_b["ids"]) == sorted(got_a["ids"])  # the very same pages
        b.call("map")
        pages = b.call("read")["pages"]
        assert sorted(pages.values()) == [[0, True]] * 4
        b.call("write", 0x5C)
        b.call("return", 2)
        # A page coming back to the model that wrote it need not be zeroed: 0x5C may stay.
        regrown = b.call("grow", 2)
        assert regrown["granted"] == 2
        b.call("map")
        assert sorted(b.call("read")["pages"].values()) == [[0x5C, True]] * 4
        assert daemon.status().daemon.pages_created == 4


def test_daemon_killed_and_restarted_while_clients_hold_pages(device_kind: str, runtime_dir: Path):
    daemon = DaemonProcess(runtime_dir, device_kind, "64MiB")
    try:
        with EngineProcess(runtime_dir, "steady") as engine:
            assert engine.call("grow", 6)["granted"] == 6
            engine.call("map")
            engine.call("write", 0x42)
            daemon.kill()
            assert shm_exists(daemon.paths.shm_name)  # a crash leaves the segment behind
            assert sorted(engine.call("read")["pages"].values()) == [[0x42, True]] * 6
            wait_for(lambda: not engine.call("ids")["connected"], what="the client to notice")
            daemon.start()  # same runtime dir: stale lock, socket and segment are replaced
            assert engine.call("wait-connected")["connected"]
            status = wait_for(lambda: (s := model_status(daemon, "steady")) and s.mapped_pages == 6 and s)
            assert status.state == ModelState.AWAKE
            head = daemon.status().daemon
            assert head.pages_granted == 6 and head.pages_created >= 6
            assert sorted(engine.call("read")["pages"].values()) == [[0x42, True]] * 6
            assert ["reconnect"] in engine.call("events")["events"]
            new_ids = engine.call("ids")["ids"]
            grown = engine.call("grow", 2)  # on the grant channel opened after the reconnect
            assert (grown["granted"], grown["denied"]) == (2, None)
            assert not set(grown["ids"]) & set(new_ids)
            assert len(engine.call("return", "all")["returned"]) == 8
            wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="adopted and new pages returned")
            assert len(new_ids) == 6
            totals = model_status(daemon, "steady")
            assert (totals.pages_granted_total, totals.pages_returned_total) == (8, 8)  # the adopted 6 count
            assert engine.exit() == 0
        daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
        cleanup_shm(daemon.paths.shm_name)


def test_pressure_reclaims_idle_pages_but_never_below_a_minimum(device_kind: str, runtime_dir: Path):
    with (
        DaemonProcess(runtime_dir, device_kind, "16MiB", "--reserve", "0", "0") as daemon,  # 8 pages
        EngineProcess(runtime_dir, "idle", "--auto-return") as idle,
        EngineProcess(runtime_dir, "busy", "--auto-return") as busy,
        ControlClient(runtime_dir=runtime_dir) as control,
    ):
        control.set_min("idle", 3 * PAGE)
        assert idle.call("grow", 8)["granted"] == 8
        idle.call("map")
        got = busy.call("grow", 4, 5)
        assert got["granted"] == 4 and got["denied"] is None
        assert ["reclaim", 4, "pressure"] in idle.call("events")["events"]
        assert len(idle.call("ids")["ids"]) == 4
        short = busy.call("grow", 4, 1)  # only 1 more may be taken: idle keeps its minimum of 3
        assert short["granted"] == 1 and short["denied"] == "budget"
        assert len(idle.call("ids")["ids"]) == 3
        assert model_status(daemon, "idle").reclaims >= 2


def test_reclaim_prefers_the_lowest_priority(device_kind: str, runtime_dir: Path):
    with (
        DaemonProcess(runtime_dir, device_kind, "16MiB", "--reserve", "0", "0"),
        EngineProcess(runtime_dir, "important", "--auto-return") as high,
        EngineProcess(runtime_dir, "batch", "--auto-return") as low,
        EngineProcess(runtime_dir, "newcomer") as newcomer,
        ControlClient(runtime_dir=runtime_dir) as control,
    ):
        control.set_priority("important", 10)
        control.set_priority("batch", -5)
        assert high.call("grow", 4)["granted"] == 4
        assert low.call("grow", 4)["granted"] == 4
        assert newcomer.call("grow", 2, 5)["granted"] == 2
        assert len(low.call("ids")["ids"]) == 2
        assert len(high.call("ids")["ids"]) == 4
        assert not [e for e in high.call("events")["events"] if e[0] == "reclaim"]


def test_sleep_returns_pages_and_wake_serves_again(device_kind: str, runtime_dir: Path):
    with (
        DaemonProcess(runtime_dir, device_kind, "64MiB") as daemon,
        EngineProcess(runtime_dir, "dozy", "--sleep-returns") as engine,
        ControlClient(runtime_dir=runtime_dir) as c,
    ):
        assert engine.call("grow", 4)["granted"] == 4
        assert c.sleep("dozy")["state"] == "draining"
        status = wait_for(lambda: (s := model_status(daemon, "dozy")).state == ModelState.ASLEEP and s)
        assert status.mapped_pages == 0 and daemon.status().daemon.pages_granted == 0
        assert engine.call("grow", 1, 0)["denied"] == "asleep"
        assert c.wake("dozy")["state"] == "awake"
        wait_for(lambda: ["wake", True] in engine.call("events")["events"], what="wake callback")
        assert engine.call("grow", 2)["granted"] == 2


def test_control_errors_are_clear(device_kind: str, runtime_dir: Path):
    with DaemonProcess(runtime_dir, device_kind, "16MiB"), ControlClient(runtime_dir=runtime_dir) as control:
        with pytest.raises(ControlError, match="no model named 'ghost' is known to this daemon"):
            control.sleep("ghost")
        with pytest.raises(ControlError, match="minimums would total 9 pages, more than the budget's 8"):
            control.set_min("greedy", 18 * MiB)
        control.set_min("modest", 4 * MiB)
        with pytest.raises(ControlError, match="has no engine attached"):
            control.sleep("modest")
        status = control.status()
        assert status["daemon"]["budget_pages"] == 8
        assert [m["model"] for m in status["models"]] == ["greedy", "modest"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_another_uid_cannot_change_a_model_it_does_not_own(device_kind: str):
    base = Path(tempfile.mkdtemp(prefix="kvmem-uid-test-"))  # pytest's own tmp dir is private to root
    base.chmod(0o755)
    runtime_dir = base / "rt"
    try:
        with (
            DaemonProcess(runtime_dir, device_kind, "16MiB", "--group", "65534"),
            EngineProcess(runtime_dir, "roots-model") as engine,
        ):
            engine.call("grow", 1)
            assert as_nobody(lambda: ControlClient(runtime_dir=runtime_dir).set_limit("roots-model", 0)) == (
                "ControlError: not permitted: model 'roots-model' belongs to uid 0, you are uid 65534"
            )
            assert as_nobody(lambda: ControlClient(runtime_dir=runtime_dir).set_limit("nobodys-model", PAGE)) == "ok"
            with ControlClient(runtime_dir=runtime_dir) as root:  # root may change anyone's model
                root.set_limit("nobodys-model", 2 * PAGE)
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_pages_another_uid_held_are_never_lent_to_another_uid():
    """A client may keep a page's descriptor after returning it: such pages stay with its uid."""
    base = Path(tempfile.mkdtemp(prefix="kvmem-uid-test-"))
    base.chmod(0o755)
    runtime_dir = base / "rt"
    try:
        args = ("--group", "65534", "--reserve", "0", "0")
        with (
            DaemonProcess(runtime_dir, "cuda", "8MiB", *args) as daemon,  # 4 pages
            EngineProcess(runtime_dir, "roots-model") as engine,
        ):
            assert engine.call("grow", 4)["granted"] == 4
            engine.call("map")
            engine.call("write", 0x77)
            engine.call("return", "all")
            wait_for(lambda: daemon.status().daemon.pages_granted == 0)

            def grow_map_read() -> None:
                from kvmem.client import DaemonClient

                with DaemonClient("nobodys-model", runtime_dir=runtime_dir) as client:
                    pages = client.acquire(4, wait=10).pages
                    assert len(pages) == 4, len(pages)
                    dev = client.device
                    with dev.reserve(4 * client.page_size) as reservation:
                        for i, page in enumerate(pages):
                            dev.map(reservation, i * client.page_size, page.physical)
                        dev.set_access(reservation, 0, 4 * client.page_size)
                        assert dev.read(reservation.address, 4 * client.page_size) == bytes(4 * client.page_size)

            assert as_nobody(grow_map_read) == "ok"
            counters = daemon.counters()
            # root's 4 pages were released to the driver and 4 fresh ones made for uid 65534.
            assert counters["cuMemCreate"] == 8 and counters["cuMemRelease"] == 4
    finally:
        shutil.rmtree(base)


def as_nobody(action) -> str:
    """Run `action` in a forked child that dropped to uid/gid 65534; return "ok" or its error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            action()
            outcome = "ok"
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        os.write(write_end, outcome.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        outcome = reader.read().decode()
    os.waitpid(pid, 0)
    return outcome


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "kvmemd stop"])
def test_shutdown_removes_socket_lock_and_shared_memory(how: str, runtime_dir: Path):
    daemon = DaemonProcess(runtime_dir, "host", "16MiB")
    with EngineProcess(runtime_dir, "m") as engine:
        engine.call("grow", 2)
        if how == "kvmemd stop":
            result = subprocess.run([KVMEMD, "stop", "--runtime-dir", str(runtime_dir)], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
            assert result.stderr.strip() == f"kvmemd for GPU 0 stopped (pid {daemon.pid})"
            daemon.proc.wait(timeout=30)
        else:
            daemon.stop(getattr(signal, how))
        assert not daemon.paths.socket.exists() and not daemon.paths.lock.exists()
        assert not shm_exists(daemon.paths.shm_name)
        wait_for(lambda: not engine.call("ids")["connected"], what="the client to be told")
        assert len(engine.call("ids")["ids"]) == 2  # it keeps its pages


def test_a_second_daemon_for_the_same_gpu_is_refused(runtime_dir: Path):
    with DaemonProcess(runtime_dir, "host", "16MiB") as daemon:
        result = subprocess.run(
            [KVMEMD, "start", "--device", "host", "--budget", "16MiB", "--runtime-dir", str(runtime_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == (
            f"Error: kvmemd is already running for GPU 0 in {runtime_dir} (pid {daemon.pid}); "
            "stop it with `kvmemd stop` or use another --runtime-dir"
        )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["--budget", "lots"],
            2,
            "Error: Invalid value for '--budget' (env var: 'KVMEM_BUDGET'): size 'lots' is not understood",
        ),
        (
            ["--host-tier", "1 parsec"],
            2,
            "Error: Invalid value for '--host-tier' (env var: 'KVMEM_HOST_TIER'): size '1 parsec' is not understood",
        ),
        (
            ["--page-size", "10%"],
            2,
            "Error: Invalid value for '--page-size' (env var: 'KVMEM_PAGE_SIZE'): size '10%' is a percentage",
        ),
        (["--budget", "1KiB"], 1, "Error: --budget 1.0 KiB is less than one 2.0 MiB page"),
        (
            ["--budget", "16MiB", "--page-size", "3MiB"],
            1,
            "Error: --page-size 3MiB (3145728 bytes) is not a multiple of the device's granularity, 2.0 MiB (2097152",
        ),
        (["--group", "no-such-group-kvmem"], 1, "Error: --group 'no-such-group-kvmem' is not a group"),
    ],
)
def test_bad_start_options_give_one_line_and_a_documented_code(
    args: list[str], code: int, message: str, runtime_dir: Path
):
    result = subprocess.run(
        [KVMEMD, "start", "--device", "host", "--runtime-dir", str(runtime_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == code  # 2: bad usage, caught as the options are read; 1: cannot start
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.strip().startswith(message)
    assert not (runtime_dir / "gpu0.lock").exists() and not (runtime_dir / "gpu0.sock").exists()


def test_stop_without_a_daemon_says_so(runtime_dir: Path):
    result = subprocess.run([KVMEMD, "stop", "--runtime-dir", str(runtime_dir)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: no kvmemd is running for GPU 0 in {runtime_dir}"


def test_detached_daemon_starts_and_stops(runtime_dir: Path):
    start = subprocess.run(
        [KVMEMD, "start", "--detach", "--device", "host", "--budget", "16MiB", "--runtime-dir", str(runtime_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert start.returncode == 0, start.stderr
    pid = int(start.stderr.strip().rsplit("pid ", 1)[1].rstrip(")"))
    try:
        with EngineProcess(runtime_dir, "bg") as engine:
            assert engine.call("grow", 1)["granted"] == 1
    finally:
        stop = subprocess.run([KVMEMD, "stop", "--runtime-dir", str(runtime_dir)], capture_output=True, text=True)
    assert stop.returncode == 0, stop.stderr
    wait_for(lambda: not _alive(pid), what="the detached daemon to exit")
    assert not (runtime_dir / "gpu0.sock").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_warm_reserve_refills_and_surplus_is_released(runtime_dir: Path):
    args = ("--reserve", "2", "4", "--release-after", "2")
    with DaemonProcess(runtime_dir, "cuda", "64MiB", *args) as daemon, EngineProcess(runtime_dir, "m") as engine:
        # The status segment is published at most every STATUS_MIN_INTERVAL_S, so a snapshot can
        # predate the last call: each wait names a running total only the awaited event can reach.
        wait_for(lambda: daemon.status().daemon.pages_free_clean == 4, what="the reserve to fill")
        assert daemon.counters()["cuMemCreate"] == 4
        assert engine.call("grow", 4)["granted"] == 4
        # The reserve refills in the background, raised to twice that GROW (4 low, 8 high); the grant
        # itself created nothing.
        wait_for(lambda: daemon.status().daemon.pages_created_total == 12, what="the refill")
        assert engine.call("grow", 2)["granted"] == 2
        assert daemon.counters()["cuMemCreate"] == 12
        engine.call("return", "all")
        # 12 pages free; once the GROWs lapse (--release-after), 8 above the configured reserve_high
        # are released. (Whether the first GROW lapsed before the second or after, the totals are these.)
        wait_for(lambda: daemon.status().daemon.pages_released_total == 8, what="surplus pages to be released")
        status = wait_for(lambda: (h := daemon.status().daemon).pages_created == 4 and h, what="the status")
        assert status.pages_free == 4
        counters = daemon.counters()
        assert counters["cuMemCreate"] == 12 and counters["cuMemRelease"] == 8
        assert counters["live.charged_bytes"] == 4 * PAGE


def test_status_is_readable_without_the_socket(runtime_dir: Path):
    with DaemonProcess(runtime_dir, "host", "16MiB") as daemon, EngineProcess(runtime_dir, "reader-test") as engine:
        engine.call("grow", 3)
        engine.call("use", 2)
        status = wait_for(lambda: (s := model_status(daemon, "reader-test")) and s.used_pages == 2 and s)
        assert status.mapped_pages == 3 and status.grants == 1 and status.last_grant_us > 0
        head = daemon.status().daemon
        assert head.daemon_pid == daemon.pid and head.device_kind == "host" and head.page_size == PAGE
        assert 0 <= daemon.status().heartbeat_age() < 5
        beat = head.heartbeat_ns
        wait_for(lambda: daemon.status().daemon.heartbeat_ns > beat, what="a heartbeat")


def test_random_grow_return_sequences_keep_accounting_exact(runtime_dir: Path):
    rng = random.Random(7)
    with DaemonProcess(runtime_dir, "host", "32MiB", "--reserve", "1", "3") as daemon:
        engines = [EngineProcess(runtime_dir, f"r{i}") for i in range(3)]
        try:
            held = [0, 0, 0]
            for _ in range(60):
                i = rng.randrange(3)
                if held[i] and rng.random() < 0.5:
                    k = rng.randint(1, held[i])
                    engines[i].call("return", k)
                    held[i] -= k
                else:
                    held[i] += engines[i].call("grow", rng.randint(1, 5), 0.2)["granted"]
                status = wait_for(
                    lambda: (s := daemon.status()) and [s.model(f"r{j}").mapped_pages for j in range(3)] == held and s,
                    what="status to match",
                )
                assert status.daemon.pages_granted == sum(held) <= 16
        finally:
            for engine in engines:
                engine.exit()
        wait_for(lambda: daemon.status().daemon.pages_granted == 0)


def test_a_request_for_more_than_the_budget_is_denied_at_once_and_starves_no_one(runtime_dir: Path):
    with (
        DaemonProcess(runtime_dir, "host", "16MiB") as daemon,  # 8 pages
        EngineProcess(runtime_dir, "greedy") as greedy,
        EngineProcess(runtime_dir, "modest") as modest,
    ):
        got = greedy.call("grow", 9)  # more than the whole budget: it could only wait, holding pages
        assert (got["granted"], got["denied"]) == (0, "budget")
        assert got["detail"] == "9 pages asked; the budget is 8 pages and model greedy holds 0"
        assert modest.call("grow", 8)["granted"] == 8
        daemon.wait_for_model("modest", lambda m: m.mapped_pages == 8, what="the status to show the grant")


def test_departed_models_pages_are_zeroed_ahead_in_the_background(device_kind: str, runtime_dir: Path):
    # A's engine goes away holding dirty pages: the daemon zeroes every one of them before anyone
    # asks, so B's grant needs no zeroing on its path, and B reads zeros.
    with DaemonProcess(runtime_dir, device_kind, "16MiB", "--reserve", "0", "0") as daemon:
        with EngineProcess(runtime_dir, "tenant-a") as a:
            got_a = a.call("grow", 6)
            assert got_a["granted"] == 6
            a.call("map")
            a.call("write", 0xAB)
            a.call("return", "all")
            assert a.exit() == 0
        head = wait_for(
            lambda: (h := daemon.status().daemon).pages_scrubbed_total >= 6 and h.pages_free_dirty == 0 and h,
            timeout=60,
            what="A's pages back and zeroed ahead",
        )
        assert head.pages_scrubbed_total == 6 and head.pages_free_clean == head.pages_free == head.pages_created
        with EngineProcess(runtime_dir, "tenant-b") as b:
            got_b = b.call("grow", 6)
            assert sorted(got_b["ids"]) == sorted(got_a["ids"])  # the very same pages
            b.call("map")
            assert sorted(b.call("read")["pages"].values()) == [[0, True]] * 6
            assert daemon.status().daemon.pages_scrubbed_total == 6  # none zeroed on the grant path
            assert b.exit() == 0


def test_the_reserve_holds_a_starting_engines_first_burst_until_it_grows_by_more_than_a_unit(
    runtime_dir: Path, clock: GrowthClock
):
    import kvmem
    from kvmem.cache.growth import MAX_BURST

    # 4 layers, 2 MiB pages of 64 blocks: one slot of every K and V range is an 8-page growth unit,
    # and the first burst, MAX_BURST (16) units, 128 pages.
    geometry = {"num_layers": 4, "block_size": 16, "num_kv_heads": 8, "head_dim": 128, "dtype": "float16"}
    with DaemonProcess(runtime_dir, "host", "1GiB", "--release-after", "0.5") as daemon:
        head = wait_for(lambda: (h := daemon.status().daemon).pages_created == 32 and h, what="the default reserve")
        assert (head.reserve_low_pages, head.reserve_high_pages) == (8, 32)
        with kvmem.connect("starting", runtime_dir=runtime_dir) as session:
            cache = session.kv_cache(**geometry, max_tokens=64 * 16 * 64, background=False)
            assert cache.pages_per_growth == 8 and MAX_BURST == 16
            # Attached, its LAYOUT sent, not grown yet: its first burst is made ahead, clean.
            head = wait_for(
                lambda: (h := daemon.status().daemon).pages_free_clean == 128 and h, timeout=60, what="the burst made"
            )
            assert (head.reserve_low_pages, head.reserve_high_pages) == (128, 128)
            clock.now += 100.0  # a lone request after a quiet spell
            first = cache.alloc(64)  # one slot: a GROW of one unit is no rising demand, the burst's reserve holds
            head = wait_for(
                lambda: (h := daemon.status().daemon).pages_granted == 8 and h.pages_free_clean == 128 and h,
                timeout=60,
                what="the reserve refilled to the burst",
            )
            assert (head.reserve_low_pages, head.reserve_high_pages) == (128, 128)
            clock.now += 100.0
            burst = cache.alloc(15 * 64)  # 15 slots at once: a GROW of 120 pages, every one made ahead
            head = wait_for(lambda: (h := daemon.status().daemon).pages_granted == 128 and h, what="the grant")
            assert head.pages_created_for_requests_total == 0
            # Its first GROW beyond a unit ended the burst's reserve: the GROW's own size (note_grow)
            # rules it until it lapses (--release-after), then the unit and the configured floor.
            head = wait_for(
                lambda: (h := daemon.status().daemon).reserve_high_pages == 32 and h, timeout=30, what="the lapse"
            )
            assert head.reserve_low_pages == 8
            cache.free(first + burst)
        # The engine left: the configured watermarks, the surplus above them released.
        wait_for(lambda: daemon.status().daemon.pages_created == 32, timeout=60, what="the surplus released")


def test_a_first_burst_reserve_is_capped_at_the_limit_and_dropped_while_asleep(runtime_dir: Path):
    import kvmem

    geometry = {"num_layers": 4, "block_size": 16, "num_kv_heads": 8, "head_dim": 128, "dtype": "float16"}
    with (
        DaemonProcess(runtime_dir, "host", "1GiB") as daemon,
        ControlClient(runtime_dir=runtime_dir) as control,
    ):
        control.set_limit("capped", 40 * 2 * MiB)  # 40 pages, under its 128-page burst
        with kvmem.connect("capped", runtime_dir=runtime_dir) as session:
            session.on_sleep(lambda offload: None)  # an engine that can drain (ours holds no block)
            session.kv_cache(**geometry, max_tokens=64 * 16 * 64, low_watermark=0, high_watermark=0)
            head = wait_for(lambda: (h := daemon.status().daemon).reserve_high_pages == 40 and h, what="the cap")
            assert head.reserve_low_pages == 40
            control.set_limit("capped", 64 * 2 * MiB)
            wait_for(lambda: daemon.status().daemon.reserve_low_pages == 64, what="the burst under the raised limit")
            control.sleep("capped")  # its burst is no longer kept
            wait_for(lambda: model_status(daemon, "capped").state == ModelState.ASLEEP, what="asleep")
            head = wait_for(lambda: (h := daemon.status().daemon).reserve_high_pages == 32 and h, what="the floor")
            assert head.reserve_low_pages == 8
            control.wake("capped")
            wait_for(lambda: daemon.status().daemon.reserve_low_pages == 64, what="the burst back on waking")


def test_the_reserve_follows_the_engines_grows_so_the_next_grant_creates_nothing(runtime_dir: Path, clock: GrowthClock):
    import kvmem

    # 4 layers, 2 MiB pages of 64 blocks: a growth unit is 8 pages; 8 slots (512 blocks) are a 64-page GROW.
    geometry = {"num_layers": 4, "block_size": 16, "num_kv_heads": 8, "head_dim": 128, "dtype": "float16"}
    with DaemonProcess(runtime_dir, "host", "1GiB", "--release-after", "600") as daemon:
        wait_for(lambda: daemon.status().daemon.pages_created == 32, what="the default reserve (8, 32)")
        with kvmem.connect("bursty", runtime_dir=runtime_dir) as session:
            cache = session.kv_cache(**geometry, max_tokens=64 * 16 * 64, background=False)
            assert cache.pages_per_growth == 8
            # Not grown yet: its first burst (16 units, 128 pages) is made ahead.
            wait_for(lambda: daemon.status().daemon.pages_free_clean == 128, timeout=60, what="the first burst")
            clock.now += 100.0  # a lone request after a quiet spell, not a burst
            first = cache.alloc(512)  # a GROW of 64 pages, from the reserve
            # The reserve now follows that GROW: low to its size (the 64 pages left free), high to twice it.
            head = wait_for(lambda: (h := daemon.status().daemon).pages_granted == 64 and h, what="the grant")
            assert (head.reserve_low_pages, head.reserve_high_pages) == (64, 128)
            clock.now += 100.0  # a lone request after a quiet spell, not a burst
            second = cache.alloc(512)  # the same GROW again: all 64 pages from the reserve...
            head = wait_for(lambda: (h := daemon.status().daemon).pages_granted == 128 and h, what="the grant")
            assert head.pages_created_for_requests_total == 0  # ...none made on the grant path
            # Below its low watermark, the reserve is refilled to the high one, ahead of the next GROW.
            head = wait_for(
                lambda: (h := daemon.status().daemon).pages_free_clean == 128 and h, timeout=60, what="the refill"
            )
            assert head.pages_created == head.pages_created_total == 256
            cache.free(first + second)


def test_a_reserve_raised_by_grows_is_released_after_release_after(runtime_dir: Path):
    import kvmem

    geometry = {"num_layers": 4, "block_size": 16, "num_kv_heads": 8, "head_dim": 128, "dtype": "float16"}
    with DaemonProcess(runtime_dir, "host", "1GiB", "--release-after", "3") as daemon:
        wait_for(lambda: daemon.status().daemon.pages_created == 32, what="the default reserve (8, 32)")
        with kvmem.connect("bursty", runtime_dir=runtime_dir) as session:
            cache = session.kv_cache(**geometry, max_tokens=64 * 16 * 64, background=False)
            ids = cache.alloc(512)  # a GROW of 64 pages raises the reserve to 128 free pages...
            wait_for(lambda: daemon.status().daemon.pages_created_total >= 192, timeout=60, what="the raised reserve")
            # ...until no GROW has needed it for 3 s: back to the configured 32, and 3 s later the rest released.
            head = wait_for(
                lambda: (h := daemon.status().daemon).pages_created == 64 + 32 and h, timeout=60, what="the release"
            )
            assert head.pages_released_total == head.pages_created_total - 96
            cache.free(ids)
