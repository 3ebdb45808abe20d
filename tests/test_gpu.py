"""On a real GPU: the device layer's lifecycle and cross-process sharing through the real driver.

Skipped where no real ``libcuda.so.1`` loads. The work runs in child processes whose environment
leaves the fake driver out, so the real one is used.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO, real_driver_env, run_python

pytestmark = pytest.mark.gpu


def test_lifecycle_and_out_of_range_checks_on_a_real_gpu():
    code = """
from kvmem.device import Access, IllegalAddressError, open_device
dev = open_device("cuda")
g = dev.granularity
r = dev.reserve(4 * g)
pages = [dev.create_page() for _ in range(3)]
maps = [dev.map(r, i * g, p) for i, p in enumerate(pages)]
dev.set_access(r, 0, 3 * g)
dev.copy_host_to_device(maps[1].address, b"kvmem" * 100)
dev.copy_device_to_device(maps[2].address, maps[1].address, 500)
assert dev.read(maps[2].address, 500) == b"kvmem" * 100
try:
    dev.memset(r.address + 3 * g, 0, 1)
    raise SystemExit("unmapped memset was not refused")
except IllegalAddressError:
    pass
dev.synchronize()
dev.close()
print("ok")
"""
    result = run_python(code, env=real_driver_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_pages_shared_between_processes_on_a_real_gpu():
    result = subprocess.run(
        [sys.executable, REPO / "examples" / "device_roundtrip.py", "--device", "cuda"],
        env=real_driver_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "ok: 4 pages shared between two processes on the cuda device" in result.stdout


def test_kv_cache_tensors_are_cuda_tensors_over_the_mapped_blocks():
    code = """
import torch, kvmem
assert torch.cuda.is_available(), "CUDA torch is needed for this test"
with kvmem.local(device="cuda", budget="1GiB") as s:
    cache = s.kv_cache(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, max_tokens=100_000)
    ids = cache.alloc(600)
    k = cache.k[1]
    assert k.is_cuda and k.data_ptr() == cache.range_address(1, "k")
    k[ids[7]] = 3.0
    torch.cuda.synchronize()
    raw = cache.device.read(cache.block_address(1, "k", ids[7]), cache.block_bytes)
    assert raw == torch.full((16, 2, 64), 3.0, dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    cache.free(ids)
print("ok")
"""
    result = run_python(code, env=real_driver_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
