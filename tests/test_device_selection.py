"""Choosing a device: `auto` takes CUDA when the driver loads and supports VMM, else host."""

from __future__ import annotations

import pytest

from kvmem.device import DeviceUnavailableError, InvalidArgumentError, open_device
from tests.support import real_driver_env, real_driver_loads, run_python

SELECT = """
from kvmem.device import DeviceUnavailableError, open_device
with open_device("auto") as dev:
    print(dev.kind)
try:
    open_device("cuda")
except DeviceUnavailableError as exc:
    print("cuda unavailable:", exc)
"""


def test_auto_picks_cuda_where_the_driver_loads():
    with open_device("auto") as dev:  # this process has the fake driver loaded
        assert dev.kind == "cuda"


def test_without_any_driver_auto_falls_back_to_host():
    if real_driver_loads():
        pytest.skip("a real CUDA driver is installed here")
    result = run_python(SELECT, env=real_driver_env())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "host"
    assert lines[1].startswith("cuda unavailable: no CUDA driver (libcuda.so.1) could be loaded")


def test_without_vmm_support_auto_falls_back_to_host():
    from tests import fakecuda

    result = run_python(SELECT, env=fakecuda.child_env(FAKECUDA_VMM_SUPPORTED="0"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "host",
        "cuda unavailable: GPU 0 (kvmem fakecuda device 0) does not support virtual memory management",
    ]


def test_a_gpu_that_does_not_exist_is_unavailable():
    with pytest.raises(DeviceUnavailableError, match="GPU 3 does not exist: the driver sees 1 GPU"):
        open_device("cuda", 3)


def test_an_unknown_kind_is_refused():
    with pytest.raises(InvalidArgumentError, match="'tpu' is not one of auto, cuda, host"):
        open_device("tpu")
