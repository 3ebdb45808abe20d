"""The fake CUDA driver enforces the driver's contract: raw cuda.bindings calls, no kvmem code.

If the fake let a broken call through, every CudaDevice test above it would prove nothing, so
each rule of the contract is checked here on its own, with the error the driver documents.
Calls that make the fake's error sticky (an illegal address) run in child processes.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from cuda.bindings import driver as cu

from tests import fakecuda
from tests.support import FAKE, FAKE_CAPACITY, run_python

R = cu.CUresult
G = 2 << 20  # the fake's default granularity


def ok(returned):
    assert returned[0] == R.CUDA_SUCCESS, returned[0]
    return returned[1] if len(returned) == 2 else returned[1:]


def prop(handle_types=cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR):
    p = cu.CUmemAllocationProp()
    p.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    p.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    p.location.id = 0
    p.requestedHandleTypes = handle_types
    return p


def access(flags=cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE):
    d = cu.CUmemAccessDesc()
    d.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    d.location.id = 0
    d.flags = flags
    return [d]


@pytest.fixture
def ctx() -> Iterator[None]:
    ok(cu.cuInit(0))
    dev = ok(cu.cuDeviceGet(0))
    context = ok(cu.cuDevicePrimaryCtxRetain(dev))
    ok(cu.cuCtxSetCurrent(context))
    before = {k: FAKE.counter(k) for k in ("live.reservations", "live.handles", "live.mappings")}
    yield
    ok(cu.cuCtxSetCurrent(None))
    ok(cu.cuDevicePrimaryCtxRelease(dev))
    assert {k: FAKE.counter(k) for k in before} == before


def test_proc_address_table_matches_the_lookups_of_the_installed_bindings(ctx):
    """Every version the bindings ask for of a function the fake implements is in its table.

    The bindings ask for the version in which each ABI variant appeared; a new bindings release
    that asks for a newer variant of one of these functions fails here until the fake has it.
    """
    table: dict[str, set[int]] = {}
    for name, version in FAKE.table():
        table.setdefault(name, set()).add(version)
    lookups = FAKE.lookups()
    asked = {(lk.name, lk.version) for lk in lookups}
    assert len(asked) > 400, "the bindings' lookups were not recorded"
    unknown = sorted((n, v) for n, v in asked if n in table and v not in table[n])
    assert unknown == [], f"bindings ask for ABI variants the fake lacks: {unknown}"
    needed = {n for n, _ in FAKE.table()} - {"cuGetProcAddress"}
    assert needed <= {n for n, _ in asked}, "a function in the fake's table is never looked up"
    assert all(lk.found for lk in lookups if lk.name in table and lk.version in table[lk.name])


def test_unknown_variant_is_not_found_never_a_wrong_one():
    lib = FAKE.lib
    lib.cuGetProcAddress_v2.argtypes = [
        ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64, ctypes.POINTER(ctypes.c_int),
    ]  # fmt: skip
    fn, status = ctypes.c_void_p(), ctypes.c_int()
    assert lib.cuGetProcAddress_v2(b"cuMemMap", ctypes.byref(fn), 10020, 0, ctypes.byref(status)) == 0
    assert fn.value and status.value == 0
    assert lib.cuGetProcAddress_v2(b"cuMemMap", ctypes.byref(fn), 12000, 0, ctypes.byref(status)) == 500
    assert fn.value is None and status.value == 2  # VERSION_NOT_SUFFICIENT
    assert lib.cuGetProcAddress_v2(b"cuMemNoSuchCall", ctypes.byref(fn), 12000, 0, ctypes.byref(status)) == 500
    assert status.value == 1  # SYMBOL_NOT_FOUND
    one = ctypes.c_void_p()
    thirteen = ctypes.c_void_p()
    lib.cuGetProcAddress_v2(b"cuCtxSynchronize", ctypes.byref(one), 2000, 0, None)
    lib.cuGetProcAddress_v2(b"cuCtxSynchronize", ctypes.byref(thirteen), 13000, 0, None)
    assert one.value and thirteen.value and one.value != thirteen.value


def test_memory_calls_need_a_current_context(ctx):
    results = []

    def no_context() -> None:
        results.append(cu.cuMemAddressReserve(G, 0, 0, 0)[0])
        results.append(cu.cuMemCreate(G, prop(), 0)[0])
        results.append(cu.cuMemGetInfo()[0])

    thread = threading.Thread(target=no_context)
    thread.start()
    thread.join()
    assert results == [R.CUDA_ERROR_INVALID_CONTEXT] * 3


def test_alignment_and_argument_rules(ctx):
    assert cu.cuMemAddressReserve(G + 4096, 0, 0, 0)[0] == R.CUDA_ERROR_INVALID_VALUE
    assert cu.cuMemAddressReserve(G, 3 * G, 0, 0)[0] == R.CUDA_ERROR_INVALID_VALUE
    assert cu.cuMemCreate(G // 2, prop(), 0)[0] == R.CUDA_ERROR_INVALID_VALUE
    bad = prop()
    bad.location.id = 7
    assert cu.cuMemCreate(G, bad, 0)[0] == R.CUDA_ERROR_INVALID_DEVICE
    base = int(ok(cu.cuMemAddressReserve(4 * G, 0, 0, 0)))
    assert base % G == 0
    handle = ok(cu.cuMemCreate(G, prop(), 0))
    assert cu.cuMemMap(base + 4096, G, 0, handle, 0)[0] == R.CUDA_ERROR_INVALID_VALUE  # misaligned
    assert cu.cuMemMap(base, G, G, handle, 0)[0] == R.CUDA_ERROR_INVALID_VALUE  # offset must be 0
    assert cu.cuMemMap(base + 4 * G, G, 0, handle, 0)[0] == R.CUDA_ERROR_INVALID_VALUE  # outside
    assert cu.cuMemMap(base, 2 * G, 0, handle, 0)[0] == R.CUDA_ERROR_INVALID_VALUE  # larger than the page
    assert cu.cuMemMap(base, G, 0, 12345, 0)[0] == R.CUDA_ERROR_INVALID_HANDLE
    ok(cu.cuMemMap(base, G, 0, handle, 0))
    assert cu.cuMemMap(base, G, 0, handle, 0)[0] == R.CUDA_ERROR_ALREADY_MAPPED
    assert cu.cuMemSetAccess(base, 2 * G, access(), 1)[0] == R.CUDA_ERROR_INVALID_VALUE  # a hole
    assert cu.cuMemAddressFree(base, 4 * G)[0] == R.CUDA_ERROR_INVALID_VALUE  # still mapped
    assert cu.cuMemUnmap(base, 2 * G)[0] == R.CUDA_ERROR_INVALID_VALUE  # not all mapped
    ok(cu.cuMemUnmap(base, G))
    ok(cu.cuMemRelease(handle))
    assert cu.cuMemRelease(handle)[0] == R.CUDA_ERROR_INVALID_VALUE  # stale handle
    ok(cu.cuMemAddressFree(base, 4 * G))


def test_unmap_must_cover_whole_mappings(ctx):
    base = int(ok(cu.cuMemAddressReserve(4 * G, 0, 0, 0)))
    big = ok(cu.cuMemCreate(2 * G, prop(), 0))
    small = ok(cu.cuMemCreate(G, prop(), 0))
    ok(cu.cuMemMap(base, 2 * G, 0, big, 0))
    ok(cu.cuMemMap(base + 2 * G, G, 0, small, 0))
    assert cu.cuMemUnmap(base, G)[0] == R.CUDA_ERROR_INVALID_VALUE  # half of a mapping
    assert cu.cuMemUnmap(base + G, 2 * G)[0] == R.CUDA_ERROR_INVALID_VALUE
    ok(cu.cuMemUnmap(base, 3 * G))  # two adjacent whole mappings
    ok(cu.cuMemRelease(big))
    ok(cu.cuMemRelease(small))
    ok(cu.cuMemAddressFree(base, 4 * G))


def test_capacity_exhaustion_is_out_of_memory_and_recoverable(ctx):
    handles = []
    while True:
        err, handle = cu.cuMemCreate(G, prop(), 0)
        if err != R.CUDA_SUCCESS:
            break
        handles.append(handle)
    assert err == R.CUDA_ERROR_OUT_OF_MEMORY
    assert len(handles) == FAKE_CAPACITY // G
    free, total = ok(cu.cuMemGetInfo())
    assert (free, total) == (0, FAKE_CAPACITY)
    ok(cu.cuMemRelease(handles.pop()))
    handles.append(ok(cu.cuMemCreate(G, prop(), 0)))
    for handle in handles:
        ok(cu.cuMemRelease(handle))
    assert ok(cu.cuMemGetInfo())[0] == FAKE_CAPACITY


def test_create_allocates_the_memory_before_any_touch(ctx):
    """cuMemCreate commits physical memory (the driver reports a shortage there, not at first use):
    the fake's allocation is backed in full before it is mapped or touched."""
    posix = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    handle = ok(cu.cuMemCreate(2 * G, prop(), 0))
    fd = int(ok(cu.cuMemExportToShareableHandle(handle, posix, 0)))
    try:
        assert os.fstat(fd).st_blocks * 512 == 2 * G
    finally:
        os.close(fd)
        ok(cu.cuMemRelease(handle))


def test_release_while_mapped_keeps_memory_until_unmap(ctx):
    base = int(ok(cu.cuMemAddressReserve(G, 0, 0, 0)))
    handle = ok(cu.cuMemCreate(G, prop(), 0))
    ok(cu.cuMemMap(base, G, 0, handle, 0))
    ok(cu.cuMemSetAccess(base, G, access(), 1))
    ok(cu.cuMemsetD8(base, 0x3C, G))
    ok(cu.cuMemRelease(handle))
    assert FAKE.counter("live.charged_bytes") == G
    out = bytearray(16)
    ok(cu.cuMemcpyDtoH(out, base, 16))
    assert out == b"\x3c" * 16
    ok(cu.cuMemUnmap(base, G))
    assert FAKE.counter("live.charged_bytes") == 0
    ok(cu.cuMemAddressFree(base, G))


def test_export_needs_the_handle_type_requested_at_creation(ctx):
    posix = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    plain = ok(cu.cuMemCreate(G, prop(cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE), 0))
    assert cu.cuMemExportToShareableHandle(plain, posix, 0)[0] == R.CUDA_ERROR_INVALID_VALUE
    ok(cu.cuMemRelease(plain))
    win32 = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_WIN32
    assert cu.cuMemCreate(G, prop(win32), 0)[0] == R.CUDA_ERROR_NOT_SUPPORTED
    shared = ok(cu.cuMemCreate(G, prop(), 0))
    fd = int(ok(cu.cuMemExportToShareableHandle(shared, posix, 0)))
    imported = ok(cu.cuMemImportFromShareableHandle(fd, posix))
    os.close(fd)  # the importer keeps its own reference
    ok(cu.cuMemRelease(shared))
    ok(cu.cuMemRelease(imported))
    other = os.memfd_create("not-a-fake-page")
    os.ftruncate(other, G)
    assert cu.cuMemImportFromShareableHandle(other, posix)[0] == R.CUDA_ERROR_INVALID_VALUE
    os.close(other)


def test_illegal_access_is_sticky_like_a_gpu_fault():
    code = """
from cuda.bindings import driver as cu
R = cu.CUresult
G = 2 << 20
cu.cuInit(0)
ctx = cu.cuDevicePrimaryCtxRetain(cu.cuDeviceGet(0)[1])[1]
cu.cuCtxSetCurrent(ctx)
p = cu.CUmemAllocationProp()
p.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
p.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
p.location.id = 0
base = int(cu.cuMemAddressReserve(G, 0, 0, 0)[1])
h = cu.cuMemCreate(G, p, 0)[1]
assert cu.cuMemMap(base, G, 0, h, 0)[0] == R.CUDA_SUCCESS
print(cu.cuMemsetD8(0x1000, 0, 8)[0].name)   # not device memory
print(cu.cuMemsetD8(base, 0, 8)[0].name)      # mapped, no access yet
print(cu.cuCtxSynchronize()[0].name)
print(cu.cuMemCreate(G, p, 0)[0].name)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "CUDA_ERROR_INVALID_VALUE",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
    ]


def test_counters_are_readable_from_another_process(tmp_path):
    counters = tmp_path / "counters"
    code = """
from kvmem.device.cuda import CudaDevice
dev = CudaDevice(0)
pages = [dev.create_page() for _ in range(5)]
r = dev.reserve(5 * dev.granularity)
for i, p in enumerate(pages):
    dev.map(r, i * dev.granularity, p)
dev.set_access(r, 0, 5 * dev.granularity)
import sys; sys.stdout.write("ready"); sys.stdout.flush(); sys.stdin.readline()
dev.close()
"""
    env = fakecuda.child_env(FAKECUDA_COUNTERS_FILE=str(counters))
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.read(5) == "ready"
        live = fakecuda.read_counters_from(counters)
        assert live["cuMemCreate"] == 5 and live["cuMemMap"] == 5 and live["cuMemSetAccess"] == 1
        assert live["live.mappings"] == 5 and live["live.charged_bytes"] == 5 * G
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    final = fakecuda.read_counters_from(counters)
    assert final["live.mappings"] == 0 and final["live.handles"] == 0 and final["live.reservations"] == 0
