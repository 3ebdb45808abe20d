"""pytest fixtures. `tests.support` is imported first: it loads the fake CUDA driver."""

from __future__ import annotations

import os

# Triton decides at import whether its own library functions (tl.max, ...) are interpreted or
# compiled, and transformers imports Triton while the test modules are collected: set the
# interpreter before anything can import it. (GPU kernel tests run compiled in a subprocess.)
os.environ["TRITON_INTERPRET"] = "1"

from collections.abc import Iterator

import pytest

from tests import fakecuda
from tests.support import FAKE, HOST_CAPACITY, GrowthClock, live_objects, real_driver_loads

from kvmem.device import Device, HostDevice  # isort: skip  (after the fake is loaded)
from kvmem.device.cuda import CudaDevice  # isort: skip

REAL_DRIVER = real_driver_loads()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if REAL_DRIVER:
        return
    skip = pytest.mark.skip(reason="no real CUDA driver (libcuda.so.1) loads on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> GrowthClock:
    """The growth decisions' clock in this process, moved by hand (`GrowthClock`)."""
    from kvmem.cache import growth

    manual = GrowthClock()
    monkeypatch.setattr(growth, "clock", manual)
    return manual


@pytest.fixture
def fake() -> fakecuda.FakeCuda | None:
    """The fake driver loaded in this process (counters, lookups, table); None on the real driver."""
    return FAKE


@pytest.fixture(params=["host", "cuda"])
def device(request: pytest.FixtureRequest) -> Iterator[Device]:
    """Each test runs on HostDevice and on CudaDevice over the fake (the real driver with
    KVMEM_TEST_DRIVER=real); nothing may leak."""
    before = live_objects()
    dev: Device = HostDevice(capacity=HOST_CAPACITY) if request.param == "host" else CudaDevice(0)
    try:
        yield dev
    finally:
        dev.close()
    assert live_objects() == before, "the fake driver holds objects the test did not give back"
