"""Shared test support. Importing it builds the fake CUDA driver and loads it into this process.

cuda-bindings resolves ``libcuda.so.1`` on its first driver call and takes a library with that
SONAME if one is already loaded, so loading the fake here (RTLD_GLOBAL), before anything calls the
driver, makes every `CudaDevice` in the test process run on it. Child processes find it through
LD_LIBRARY_PATH, set here for them. Tests that need a real GPU are marked `gpu` and run their GPU
work in child processes whose environment leaves the fake out (`real_driver_env`).

With ``KVMEM_TEST_DRIVER=real`` the fake is neither built nor loaded: "cuda" in the device and daemon
tests is then the real driver (`FAKE` is None). `make gpu-check` sets it for its ``pytest -m gpu``, and
the `gpu` tests for a child pytest that runs the fake-driver contract tests again on the real driver
(tests/test_gpu_paths.py).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvmem.common.protocol import SCHEMAS, MsgType
from tests import fakecuda

REAL_CUDA = os.environ.get("KVMEM_TEST_DRIVER") == "real"
# Read by the fake at cuInit: a small device so out-of-memory is cheap to reach.
FAKE_CAPACITY = 512 << 20
_ENV_WITHOUT_FAKE = {k: v for k, v in os.environ.items() if not k.startswith("FAKECUDA_")}
FAKE: fakecuda.FakeCuda | None = None
if not REAL_CUDA:
    os.environ["FAKECUDA_CAPACITY_BYTES"] = str(FAKE_CAPACITY)
    FAKE = fakecuda.load()
    os.environ["LD_LIBRARY_PATH"] = fakecuda.child_env()["LD_LIBRARY_PATH"]

REPO = Path(__file__).resolve().parent.parent
HOST_CAPACITY = 512 << 20
LIVE_GAUGES = fakecuda.LIVE_GAUGES


def real_driver_env() -> dict[str, str]:
    """The environment this process had before the fake was put on LD_LIBRARY_PATH."""
    return dict(_ENV_WITHOUT_FAKE)


def real_driver_loads() -> bool:
    """Whether a real ``libcuda.so.1`` loads here (checked in a child without the fake)."""
    probe = "import ctypes; ctypes.CDLL('libcuda.so.1')"
    result = subprocess.run([sys.executable, "-c", probe], env=real_driver_env(), capture_output=True)
    return result.returncode == 0


def live_objects() -> dict[str, int]:
    """The fake driver's gauges of live reservations, handles, allocations, mappings, bytes, host buffers
    (none on the real driver)."""
    return {name: FAKE.counter(name) for name in LIVE_GAUGES} if FAKE is not None else {}


def run_python(code: str, *args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (the fake on LD_LIBRARY_PATH unless `env` says otherwise)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=os.environ.copy() if env is None else env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        **kwargs,
    )


def pack_unchecked(msg_type: MsgType, body: dict[str, Any]) -> bytes:
    """`body` in the packed layout of GROW, GRANT or RETURN without the schema's bounds, so that tests
    can send values a daemon must refuse.

    Raises:
        KeyError: The fields are not exactly the schema's.
        TypeError: A value a packed body cannot carry: anything but integers (True would pass for 1),
            and for GRANT's "done" anything but a boolean (it is a flag bit).
        struct.error: An integer that is not a u32.
    """
    if body.keys() != SCHEMAS[msg_type].keys():
        raise KeyError("not exactly the schema's fields")
    numbers = [v for name, v in body.items() if name != "done"]
    if any(type(item) is not int for v in numbers for item in (v if type(v) is list else [v])):
        raise TypeError("not an integer")
    if msg_type == MsgType.GROW:
        return struct.pack("!III", body["req"], body["pages"], body["wait_ms"])
    ids = body["pages"]
    if msg_type == MsgType.RETURN:
        return struct.pack(f"!{len(ids)}I", *ids)
    if type(body["done"]) is not bool:
        raise TypeError("done is not a boolean")
    return struct.pack(f"!II{len(ids)}I", body["req"], int(body["done"]), *ids)


class GrowthClock:
    """The clock the cache's growth decisions read (`kvmem.cache.growth.clock`), moved by hand, so
    that sizing from the demand rate is exact: allocs with the clock left as it is come as one burst;
    `now += 100` before an alloc makes it a lone request after a quiet spell (the `clock` fixture)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now
