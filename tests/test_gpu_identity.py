"""A GPU is known by its UUID, whatever ordinal CUDA_VISIBLE_DEVICES gives it in a process.

Runs the real cuda-bindings path on the fake driver, in child processes (the environment is read
when the driver initializes).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmem.common.runtime import DaemonPaths
from kvmem.device.cuda import format_uuid
from tests import fakecuda
from tests.daemon_support import DaemonProcess, EngineProcess, cleanup_shm, wait_for

PROBE = """
import json
from kvmem.device import DeviceError, open_device
seen = []
for ordinal in range(3):
    try:
        with open_device("cuda", ordinal) as dev:
            seen.append([dev.uuid, dev.name])
    except DeviceError as exc:
        seen.append(str(exc))
print(json.dumps(seen))
"""


def probe(**env: str) -> list:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=fakecuda.child_env(**env), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_each_physical_gpu_has_its_own_uuid():
    assert probe(FAKECUDA_DEVICE_COUNT="2") == [
        [fakecuda.gpu_uuid(0), "kvmem fakecuda device 0"],
        [fakecuda.gpu_uuid(1), "kvmem fakecuda device 1"],
        "GPU 2 does not exist: the driver sees 2 GPU(s)",
    ]


def test_cuda_visible_devices_renumbers_but_the_uuid_stays():
    assert probe(FAKECUDA_DEVICE_COUNT="3", CUDA_VISIBLE_DEVICES="2,0") == [
        [fakecuda.gpu_uuid(2), "kvmem fakecuda device 2"],
        [fakecuda.gpu_uuid(0), "kvmem fakecuda device 0"],
        "GPU 2 does not exist: the driver sees 2 GPU(s)",
    ]


def test_no_visible_gpu_is_no_device():
    seen = probe(CUDA_VISIBLE_DEVICES="")
    assert all("CUDA_ERROR_NO_DEVICE" in entry for entry in seen), seen


@pytest.mark.parametrize("raw", [bytes(range(16)), bytes(range(16)).decode("latin-1")])
def test_uuids_are_written_as_nvidia_smi_writes_them(raw):
    assert format_uuid(raw) == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"


def test_an_engine_finds_the_daemon_of_the_gpu_it_uses_whatever_its_ordinal(tmp_path):
    # The host's GPU 1 has a daemon; an engine in a "container" that sees only that GPU calls it cuda:0.
    runtime_dir = tmp_path / "rt"
    two_gpus = fakecuda.child_env(FAKECUDA_DEVICE_COUNT="2")
    only_gpu_1 = fakecuda.child_env(FAKECUDA_DEVICE_COUNT="2", CUDA_VISIBLE_DEVICES="1")
    try:
        with (
            DaemonProcess(runtime_dir, "cuda", "16MiB", env=two_gpus, gpu=1) as daemon,
            EngineProcess(runtime_dir, "contained", env=only_gpu_1) as engine,
        ):
            assert engine.call("grow", 2)["granted"] == 2
            wait_for(lambda: (m := daemon.status().model("contained")) and m.mapped_pages == 2, what="the grant")
    finally:
        cleanup_shm(DaemonPaths.resolve(runtime_dir, 1).shm_name)


def test_an_engine_never_takes_the_daemon_of_another_gpu_that_has_its_ordinal(tmp_path):
    # Only the host's GPU 0 has a daemon (gpu0.sock); the engine's cuda:0 is the host's GPU 1.
    runtime_dir = tmp_path / "rt"
    code = f"import kvmem; kvmem.connect('lost', runtime_dir={str(runtime_dir)!r})"
    only_gpu_1 = fakecuda.child_env(FAKECUDA_DEVICE_COUNT="2", CUDA_VISIBLE_DEVICES="1")
    try:
        with DaemonProcess(runtime_dir, "cuda", "16MiB", env=fakecuda.child_env(FAKECUDA_DEVICE_COUNT="2")) as daemon:
            result = subprocess.run([sys.executable, "-c", code], env=only_gpu_1, capture_output=True, text=True)
            assert result.returncode == 1
            assert result.stderr.strip().splitlines()[-1] == (
                f"kvmem.common.errors.DaemonRefusedError: kvmemd at {daemon.paths.socket} serves GPU "
                f"{fakecuda.gpu_uuid(0)}, but this process's GPU 0 is {fakecuda.gpu_uuid(1)} (CUDA_VISIBLE_DEVICES "
                "numbers GPUs per process): start kvmemd for this GPU, or connect to its daemon"
            )
            # The refusal comes once WELCOME names the daemon's GPU: the name stays known, detached, holding nothing.
            lost = daemon.status().model("lost")
            assert lost is None or (lost.state.name, lost.mapped_pages) == ("DETACHED", 0)
    finally:
        cleanup_shm(DaemonPaths.resolve(runtime_dir, 0).shm_name)
