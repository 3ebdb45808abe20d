"""A GPU is known by its UUID, whatever ordinal CUDA_VISIBLE_DEVICES gives it in a process.

Runs the real cuda-bindings path on the fake driver, in child processes (the environment is read
when the driver initializes).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmem.device.cuda import format_uuid
from tests import fakecuda

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
        ["GPU-fa4ec0da-0000-4000-8000-000000000000", "kvmem fakecuda device 0"],
        ["GPU-fa4ec0da-0000-4000-8000-000000000001", "kvmem fakecuda device 1"],
        "GPU 2 does not exist: the driver sees 2 GPU(s)",
    ]


def test_cuda_visible_devices_renumbers_but_the_uuid_stays():
    assert probe(FAKECUDA_DEVICE_COUNT="3", CUDA_VISIBLE_DEVICES="2,0") == [
        ["GPU-fa4ec0da-0000-4000-8000-000000000002", "kvmem fakecuda device 2"],
        ["GPU-fa4ec0da-0000-4000-8000-000000000000", "kvmem fakecuda device 0"],
        "GPU 2 does not exist: the driver sees 2 GPU(s)",
    ]


def test_no_visible_gpu_is_no_device():
    seen = probe(CUDA_VISIBLE_DEVICES="")
    assert all("CUDA_ERROR_NO_DEVICE" in entry for entry in seen), seen


@pytest.mark.parametrize("raw", [bytes(range(16)), bytes(range(16)).decode("latin-1")])
def test_uuids_are_written_as_nvidia_smi_writes_them(raw):
    assert format_uuid(raw) == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
