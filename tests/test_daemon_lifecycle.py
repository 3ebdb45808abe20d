"""One daemon per physical GPU, and start-up that never takes over what another daemon holds.

The CUDA cases run `kvmemd --device cuda` on the fake driver (tests/fakecuda), which gives each
physical device a fixed UUID and renumbers devices under CUDA_VISIBLE_DEVICES as the driver does.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import kvmem
from kvmem.common import protocol
from kvmem.common.errors import DaemonUnavailableError
from kvmem.common.layout import KVLayout
from kvmem.common.protocol import MsgType
from kvmem.common.runtime import DaemonPaths
from kvmemd.launcher import read_lock_pid
from tests import fakecuda
from tests.daemon_support import KVMEMD, DaemonProcess, EngineProcess, cleanup_shm, shm_exists, wait_for

UUID_0 = fakecuda.gpu_uuid(0)  # the fake's physical device 0 in this test session
UUID_1 = fakecuda.gpu_uuid(1)


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Path:
    path = tmp_path / "rt"
    yield path
    cleanup_shm(DaemonPaths.resolve(path, 0).shm_name)
    cleanup_shm(DaemonPaths.resolve(path, 1).shm_name)


def start(runtime_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`kvmemd start` that is expected to fail: its result."""
    return subprocess.run(
        [KVMEMD, "start", "--budget", "16MiB", "--runtime-dir", str(runtime_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else fakecuda.child_env(),
    )


@pytest.mark.parametrize("detach", [False, True])
def test_a_refused_start_leaves_the_running_daemon_its_lock(detach: bool, runtime_dir: Path):
    with DaemonProcess(runtime_dir, "host", "16MiB") as daemon:
        flags = ["--detach"] if detach else []
        for _ in range(2):  # the second refusal proves the first left the lock in place
            result = start(runtime_dir, "--device", "host", *flags)
            assert result.returncode == 1
            assert result.stderr.strip().splitlines()[-1] == (
                f"Error: kvmemd is already running for GPU 0 in {runtime_dir} (pid {daemon.pid}); "
                "stop it with `kvmemd stop` or use another --runtime-dir"
            )
            assert read_lock_pid(daemon.paths) == daemon.pid
        stop = subprocess.run([KVMEMD, "stop", "--runtime-dir", str(runtime_dir)], capture_output=True, text=True)
        assert stop.returncode == 0, stop.stderr
        assert stop.stderr.strip() == f"kvmemd for GPU 0 stopped (pid {daemon.pid})"
        daemon.proc.wait(timeout=30)


def test_a_second_daemon_for_the_same_gpu_is_refused_in_any_runtime_directory(tmp_path: Path):
    first, second = tmp_path / "root-run", tmp_path / "user-run"
    try:
        with DaemonProcess(first, "cuda", "16MiB") as daemon:
            result = start(second, "--device", "cuda")
            assert result.returncode == 1
            assert result.stderr.strip().splitlines()[-1] == (
                f"Error: GPU 0 ({UUID_0}) is already served by kvmemd pid {daemon.pid}, maybe in another runtime "
                "directory: stop that daemon first (kvmemd stop --runtime-dir DIR), or use its socket"
            )
            assert not (second / "gpu0.sock").exists() and not (second / "gpu0.lock").exists()
    finally:
        for path in (first, second):
            cleanup_shm(DaemonPaths.resolve(path, 0).shm_name)


def test_the_same_gpu_under_another_ordinal_is_still_the_same_gpu(tmp_path: Path):
    first, second = tmp_path / "a", tmp_path / "b"
    two_gpus = fakecuda.child_env(FAKECUDA_DEVICE_COUNT="2")
    try:
        with DaemonProcess(first, "cuda", "16MiB", env=two_gpus, gpu=1) as daemon:
            # A container that sees only physical GPU 1 calls it GPU 0.
            only_gpu_1 = fakecuda.child_env(FAKECUDA_DEVICE_COUNT="2", CUDA_VISIBLE_DEVICES="1")
            result = start(second, "--device", "cuda", "--gpu", "0", env=only_gpu_1)
            assert result.returncode == 1
            assert f"GPU 0 ({UUID_1}) is already served by kvmemd pid {daemon.pid}" in result.stderr
            # Physical GPU 0 is free: its daemon starts beside the first.
            with DaemonProcess(second, "cuda", "16MiB", env=two_gpus) as other:
                assert other.status().daemon.gpu == 0
    finally:
        for path in (first, second):
            for gpu in (0, 1):
                cleanup_shm(DaemonPaths.resolve(path, gpu).shm_name)


def test_a_gpu_daemon_links_its_socket_by_uuid_for_engines(runtime_dir: Path):
    with DaemonProcess(runtime_dir, "cuda", "16MiB") as daemon:
        link = runtime_dir / "by-uuid" / f"{UUID_0}.sock"
        assert os.readlink(link) == "../gpu0.sock"
        assert DaemonPaths.for_uuid(runtime_dir, UUID_0) == daemon.paths
        with pytest.raises(DaemonUnavailableError, match=f"no kvmemd serves GPU {UUID_1} in {runtime_dir}"):
            DaemonPaths.for_uuid(runtime_dir, UUID_1)
    assert not link.exists()


@pytest.mark.parametrize("detach", [False, True])
def test_a_gpu_that_does_not_exist_is_an_error_not_host_memory(detach: bool, runtime_dir: Path):
    result = start(runtime_dir, "--gpu", "7", *(["--detach"] if detach else []))  # --device cuda is the default
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: GPU 7 is not usable: GPU 7 does not exist: the driver sees 1 GPU(s). "
        "To serve host memory instead, start with --device host"
    )
    assert not (runtime_dir / "gpu7.sock").exists() and not (runtime_dir / "gpu7.lock").exists()


def test_no_driver_at_all_is_an_error_not_host_memory(runtime_dir: Path):
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}  # no fake: no libcuda.so.1 loads
    result = start(runtime_dir, env=env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: GPU 0 is not usable: no CUDA driver (libcuda.so.1) could be loaded")
    assert last.endswith("To serve host memory instead, start with --device host")


def test_auto_is_not_a_daemon_device(runtime_dir: Path):
    result = start(runtime_dir, "--device", "auto")
    assert result.returncode == 2
    assert "'auto' is not one of 'cuda', 'host'" in result.stderr


@pytest.mark.parametrize("detach", [False, True])
def test_a_runtime_directory_that_cannot_be_changed_is_one_line(detach: bool):
    # /proc/self/fdinfo exists and belongs to us, but no one may chmod it (as a read-only file system).
    path = "/proc/self/fdinfo"
    result = subprocess.run(
        [KVMEMD, "start", "--device", "host", "--budget", "16MiB", "--runtime-dir", path, *(["--detach"] * detach)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: cannot ")
    assert "Traceback" not in result.stderr and "[Errno" not in result.stderr


def test_a_layout_frame_claiming_a_billion_layers_costs_what_it_is(runtime_dir: Path):
    layout = KVLayout.derive(2, 16, 2, 64, "float16", "NHD", 2 << 20, 1024).to_dict()
    layout["num_layers"] = 10**9  # everything else, the two offset lists included, as for 2 layers
    frame = protocol.encode(MsgType.LAYOUT, {"layout": layout})
    assert len(frame) < 1024
    with DaemonProcess(runtime_dir, "host", "16MiB") as daemon:
        sock = daemon.paths.connect()
        try:
            hello = {"version": protocol.PROTOCOL_VERSION, "role": "engine", "model": "liar", "asleep": False}
            protocol.send_message(sock, MsgType.HELLO, {**hello, "adopt": 0, "page_size": 0})
            protocol.receive_expected(sock, MsgType.WELCOME)
            sock.send(frame)
            while (msg := protocol.receive_message(sock)).type != MsgType.ERROR:
                pass  # POLICY and the like, sent after WELCOME
            assert msg["message"] == "layout descriptor: k_offsets has 2 entries for 1000000000 layers"
        finally:
            sock.close()
        with EngineProcess(runtime_dir, "honest") as engine:  # the daemon serves on
            assert engine.call("grow", 1)["granted"] == 1


def test_a_killed_daemon_is_gone_at_once_and_kvmemd_stop_removes_what_it_left(runtime_dir: Path):
    daemon = DaemonProcess(runtime_dir, "host", "16MiB")
    pid = daemon.pid
    daemon.kill()  # SIGKILL: no clean-up
    assert daemon.paths.socket.exists() and shm_exists(daemon.paths.shm_name)
    kvctl = [str(Path(KVMEMD).with_name("kvctl")), "--runtime-dir", str(runtime_dir)]

    status = subprocess.run([*kvctl, "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 3  # at once, not after the heartbeat has aged
    assert status.stderr.strip() == (
        f"Error: no kvmemd for GPU 0 in {runtime_dir} (kvmemd pid {pid} died without cleaning up; its socket and "
        "status segment are stale, `kvmemd stop` removes them): start one with `kvmemd start --gpu 0`"
    )
    doctor = subprocess.run([*kvctl, "doctor", "--json"], capture_output=True, text=True, timeout=60)
    assert doctor.returncode == 1
    checks = {c["check"]: c for c in json.loads(doctor.stdout)}
    assert checks["socket"]["status"] == "fail" and "is stale: no daemon listens" in checks["socket"]["detail"]
    assert checks["status"]["status"] == "fail" and f"kvmemd pid {pid} is gone" in checks["status"]["detail"]

    stop = subprocess.run([KVMEMD, "stop", "--runtime-dir", str(runtime_dir)], capture_output=True, text=True)
    assert stop.returncode == 0
    assert stop.stderr.strip() == (
        f"no kvmemd was running for GPU 0 in {runtime_dir}; removed what a dead one left: socket "
        f"{daemon.paths.socket}, status segment {daemon.paths.shm_name}, lock file {daemon.paths.lock}"
    )
    assert not daemon.paths.socket.exists() and not daemon.paths.lock.exists()
    assert not shm_exists(daemon.paths.shm_name)


def test_a_drain_that_does_not_finish_is_rolled_back_to_awake(runtime_dir: Path):
    geometry = {"num_layers": 2, "block_size": 16, "num_kv_heads": 2, "head_dim": 64}  # 512 blocks a page
    kvctl = [str(Path(KVMEMD).with_name("kvctl")), "--runtime-dir", str(runtime_dir)]
    with (
        DaemonProcess(runtime_dir, "host", "16MiB", "--drain-timeout", "0.5") as daemon,
        kvmem.connect("stubborn", runtime_dir=runtime_dir) as session,
    ):
        session.on_sleep(lambda offload: None)  # a drain hook that frees nothing: the sleep cannot finish
        cache = session.kv_cache(**geometry, max_tokens=16 * 4096, low_watermark=0, high_watermark=0)
        kept = cache.alloc(100)
        result = subprocess.run([*kvctl, "sleep", "stubborn", "--wait"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 6
        assert result.stderr == (
            "Error: model 'stubborn': sleep rolled back: the drain did not finish within 0.5 s; it is awake\n"
        )
        wait_for(lambda: not cache.asleep, what="the cache to be woken")
        more = cache.alloc(10)  # usable again, its blocks untouched
        assert not set(more) & set(kept)
        status = daemon.status().model("stubborn")
        assert status.state.name == "AWAKE" and status.waiting_for.startswith("sleep rolled back")


def test_ctrl_c_while_waiting_for_a_sleep_says_the_model_keeps_draining(runtime_dir: Path):
    geometry = {"num_layers": 2, "block_size": 16, "num_kv_heads": 2, "head_dim": 64}
    kvctl = [str(Path(KVMEMD).with_name("kvctl")), "--runtime-dir", str(runtime_dir)]
    with (
        # A drain timeout far beyond the test: on a loaded machine the default 30 s could roll the sleep
        # back (kvctl then exits 6, not 130) before kvctl has handled the interrupt.
        DaemonProcess(runtime_dir, "host", "16MiB", "--drain-timeout", "600") as daemon,
        kvmem.connect("slow", runtime_dir=runtime_dir) as session,
    ):
        session.on_sleep(lambda offload: None)  # a drain hook that frees nothing: the drain goes on
        cache = session.kv_cache(**geometry, max_tokens=16 * 4096, low_watermark=0, high_watermark=0)
        cache.alloc(100)
        waiting = subprocess.Popen([*kvctl, "sleep", "slow", "--wait"], stderr=subprocess.PIPE, text=True)
        try:
            daemon.wait_for_model("slow", lambda m: m.state.name == "DRAINING", what="the drain")
            waiting.send_signal(signal.SIGINT)
            _, stderr = waiting.communicate(timeout=30)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
        assert waiting.returncode == 130
        assert stderr == "Error: interrupted; model 'slow' keeps draining: `kvctl wake` cancels the sleep\n"
        subprocess.run([*kvctl, "wake", "slow", "--wait"], capture_output=True, check=True, timeout=60)


@pytest.mark.parametrize("name", ["", "x" * 65, "modèle"])
def test_an_engine_with_an_invalid_model_name_is_told_the_rule_before_connecting(name: str, tmp_path: Path):
    with pytest.raises(ValueError) as info:
        kvmem.connect(name, runtime_dir=tmp_path / "no-daemon-here")  # the name is checked first
    assert str(info.value).endswith(
        "is not valid: use 1 to 64 ASCII letters, digits and . _ : / @ + -, starting with a letter or digit"
    )


def test_an_invalid_kvmem_model_for_an_engine_integration_is_one_line(monkeypatch: pytest.MonkeyPatch):
    from kvmem.integrations.vllm import allocation

    monkeypatch.setenv("KVMEM_MODEL", "my model")
    with pytest.raises(RuntimeError, match=r"^kvmem: KVMEM_MODEL: model name 'my model' is not valid: use "):
        allocation.model_name()


def test_a_client_that_cannot_re_register_says_so_once_and_backs_off(runtime_dir: Path):
    daemon = DaemonProcess(runtime_dir, "host", "16MiB")
    engine = EngineProcess(runtime_dir, "patient")
    assert engine.call("grow", 1)["granted"] == 1
    daemon.kill()
    # Something that accepts and hangs up at once, where the daemon was: every re-registration fails.
    daemon.paths.socket.unlink()
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    impostor.bind(str(daemon.paths.socket))
    impostor.listen(64)
    accepted = 0
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if select.select([impostor], [], [], 0.1)[0]:
                impostor.accept()[0].close()
                accepted += 1
    finally:
        impostor.close()
        engine.kill()
        cleanup_shm(daemon.paths.shm_name)
    stderr = engine.proc_stderr
    assert accepted >= 2  # it kept trying
    assert accepted <= 8  # with back-off (50 ms doubling to 1 s), not every 50 ms
    assert stderr.count("re-registering with kvmemd failed") == 1, stderr


def test_an_engine_without_a_drain_hook_is_never_put_to_sleep_holding_pages(runtime_dir: Path):
    geometry = {"num_layers": 2, "block_size": 16, "num_kv_heads": 2, "head_dim": 64}
    kvctl = [str(Path(KVMEMD).with_name("kvctl")), "--runtime-dir", str(runtime_dir)]
    with DaemonProcess(runtime_dir, "host", "16MiB") as daemon, kvmem.connect("hookless", runtime_dir=runtime_dir) as s:
        cache = s.kv_cache(**geometry, max_tokens=16 * 4096, low_watermark=0, high_watermark=0)
        for offload in ([], ["--offload"]):
            cache.alloc(1)
            result = subprocess.run([*kvctl, "sleep", "hookless", *offload], capture_output=True, text=True)
            assert result.returncode == 1
            assert result.stderr == (
                "Error: model 'hookless' cannot sleep: its engine registered no drain hook and holds 4 pages it "
                "may still be using (an engine integration registers one: session.on_sleep)\n"
            )
            assert daemon.status().model("hookless").state.name == "AWAKE" and not cache.asleep
        s.on_sleep(lambda offload: None)  # now it can drain: the sleep is accepted
        result = subprocess.run([*kvctl, "sleep", "hookless", "--offload", "--wait"], capture_output=True, text=True)
        assert (result.returncode, result.stderr) == (0, "hookless: asleep\n")
