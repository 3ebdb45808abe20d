"""The device layer's contract, on HostDevice and on CudaDevice over the fake driver.

Every test takes the `device` fixture, so it runs once per backend; the fixture also checks that
the fake driver holds no object the test did not give back. On a GPU, tests/test_gpu_paths.py runs
the "cuda" cases again on the real driver (KVMEM_TEST_DRIVER=real, `FAKE` is None): what only the
fake can show (its call counters, its exact capacity, a CPU read of device memory) is checked there
only when the fake is loaded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import psutil
import pytest

from kvmem.device import (
    Access,
    AlreadyMappedError,
    ClosedError,
    Device,
    IllegalAddressError,
    InvalidArgumentError,
    OutOfMemoryError,
)
from tests.support import FAKE, FAKE_CAPACITY, HOST_CAPACITY, REAL_CUDA, REPO

CHILD = str(REPO / "tests" / "device_child.py")


def test_lifecycle_reserve_create_map_access_write_read_unmap_release(device: Device):
    g = device.granularity
    reservation = device.reserve(4 * g)
    assert reservation.address % g == 0 and reservation.size == 4 * g
    page = device.create_page()
    mapping = device.map(reservation, 2 * g, page)
    assert mapping.address == reservation.address + 2 * g
    assert mapping.access is Access.NONE
    with pytest.raises(IllegalAddressError, match="needs READ_WRITE"):
        device.memset(mapping.address, 1, 16)  # no access granted yet

    device.set_access(reservation, 2 * g, g)
    assert mapping.access is Access.READ_WRITE
    payload = bytes(range(256)) * (g // 256)
    device.copy_host_to_device(mapping.address, payload)
    assert device.read(mapping.address, g) == payload
    device.memset(mapping.address + 100, 0xAB, 50)
    got = device.read(mapping.address + 90, 70)
    assert got == payload[90:100] + b"\xab" * 50 + payload[150:160]
    device.copy_device_to_device(mapping.address, mapping.address + 100, 50)
    assert device.read(mapping.address, 50) == b"\xab" * 50

    device.synchronize()
    mapping.close()
    assert mapping.closed and reservation.mapping_at(2 * g) is None
    with pytest.raises(IllegalAddressError, match="not mapped"):
        device.read(reservation.address + 2 * g, 1)
    page.close()
    reservation.close()
    assert page.closed and reservation.closed


def test_same_page_mapped_twice_shows_the_same_bytes(device: Device):
    g = device.granularity
    with device.reserve(2 * g) as reservation, device.create_page() as page:
        first = device.map(reservation, 0, page)
        second = device.map(reservation, g, page)
        device.set_access(reservation, 0, 2 * g)
        device.memset(first.address, 0x5A, g)
        assert device.read(second.address, g) == b"\x5a" * g


def test_release_while_mapped_keeps_memory_until_unmapped(device: Device):
    g = device.granularity
    free_before = device.memory_info().free
    reservation = device.reserve(g)
    page = device.create_page()
    mapping = device.map(reservation, 0, page)
    device.set_access(reservation, 0, g)
    device.memset(mapping.address, 0x77, g)
    page.close()
    assert device.read(mapping.address, g) == b"\x77" * g
    # Memory still belongs to the mapping: released from the pool only at unmap.
    assert device.memory_info().free <= free_before - g
    mapping.close()
    assert device.memory_info().free >= free_before - (0 if device.kind == "cuda" else g // 2)
    reservation.close()


def test_page_exported_imported_and_written_by_second_process(device: Device):
    g = device.granularity
    with device.reserve(g) as reservation:
        page = device.create_page()
        mapping = device.map(reservation, 0, page)
        device.set_access(reservation, 0, g)
        device.memset(mapping.address, 0x11, g)
        with page.export() as exported:
            child = subprocess.run(
                [sys.executable, CHILD, "import-write", device.kind, str(exported.fd), str(g), "17", "34"],
                pass_fds=(exported.fd,),
                capture_output=True,
                text=True,
                timeout=120,
            )
        assert child.returncode == 0, child.stderr
        assert device.read(mapping.address, g) == b"\x22" * g  # 34, written by the child
        page.close()


def test_out_of_memory_is_typed_and_the_device_stays_usable(device: Device):
    g = device.granularity
    real = device.kind == "cuda" and FAKE is None
    # A real GPU: what it has free now (the context and other processes hold some), and a bounded loop.
    capacity = HOST_CAPACITY if device.kind == "host" else device.memory_info().free if real else FAKE_CAPACITY
    pages = []
    with pytest.raises(OutOfMemoryError):
        while len(pages) <= capacity // g:
            pages.append(device.create_page())
    if real:
        assert 0 < len(pages) <= capacity // g
    else:
        assert len(pages) == capacity // g
        assert device.memory_info().free == 0
    pages.pop().close()
    with device.reserve(g) as reservation:
        page = device.create_page()  # the freed room is usable again
        mapping = device.map(reservation, 0, page)
        device.set_access(reservation, 0, g)
        device.memset(mapping.address, 9, g)
        assert device.read(mapping.address, 4) == b"\x09" * 4
        page.close()
    for page in pages:
        page.close()


def test_misaligned_input_is_refused_before_any_driver_call(device: Device, fake):
    g = device.granularity
    reservation = device.reserve(2 * g)
    page = device.create_page()
    if fake is not None:
        fake.reset_call_counters()
    cases = [
        lambda: device.reserve(g + 1),
        lambda: device.reserve(0),
        lambda: device.reserve(g, alignment=3 * g),
        lambda: device.create_page(g // 2),
        lambda: device.create_page(-g),
        lambda: device.map(reservation, g // 2, page),
        lambda: device.map(reservation, 2 * g, page),  # past the end
        lambda: device.set_access(reservation, 0, g + 4096),
        lambda: device.import_page(-1, g),
        lambda: device.import_page(0, g - 1),
        lambda: device.memset(reservation.address, 256, 1),
    ]
    for case in cases:
        with pytest.raises(InvalidArgumentError):
            case()
    if fake is not None:
        driver_calls = {k: v for k, v in fake.counters().items() if not k.startswith("live.") and v}
        assert driver_calls == {}
    page.close()
    reservation.close()


def test_mapping_over_a_mapped_range_is_already_mapped(device: Device):
    g = device.granularity
    with device.reserve(4 * g) as reservation, device.create_page(2 * g) as big, device.create_page() as small:
        device.map(reservation, g, big)  # covers [g, 3g)
        for offset in (g, 2 * g):
            with pytest.raises(AlreadyMappedError):
                device.map(reservation, offset, small)
        with pytest.raises(AlreadyMappedError):
            device.map(reservation, 0, big)  # [0, 2g) overlaps the start
        device.map(reservation, 3 * g, small)  # the free slot still maps


def test_set_access_covers_runs_of_whole_mappings_in_one_call(device: Device, fake):
    g = device.granularity
    with device.reserve(8 * g) as reservation:
        pages = [device.create_page() for _ in range(6)]
        for i, page in enumerate(pages):
            device.map(reservation, i * g, page)
        if fake is not None:
            fake.reset_call_counters()
        device.set_access(reservation, 0, 6 * g)
        if device.kind == "cuda" and fake is not None:
            assert fake.counter("cuMemSetAccess") == 1
        device.memset(reservation.address, 3, 6 * g)
        with pytest.raises(InvalidArgumentError, match="not made of whole mapped pages"):
            device.set_access(reservation, 4 * g, 3 * g)  # slot 6 is a hole
        device.set_access(reservation, 2 * g, 2 * g, Access.READ)
        assert device.read(reservation.address + 2 * g, 8) == b"\x03" * 8
        with pytest.raises(IllegalAddressError, match="READ_WRITE"):
            device.memset(reservation.address + 3 * g, 0, 1)
        device.memset(reservation.address + 4 * g, 0, 1)  # the neighbour is still writable
        for page in pages:
            page.close()


def test_illegal_ranges_raise_and_the_device_stays_usable(device: Device):
    g = device.granularity
    with device.reserve(2 * g) as reservation, device.create_page() as page:
        mapping = device.map(reservation, 0, page)
        device.set_access(reservation, 0, g)
        with pytest.raises(IllegalAddressError):
            device.memset(mapping.address + g - 8, 0, 16)  # runs into the unmapped slot
        with pytest.raises(IllegalAddressError):
            device.copy_device_to_device(mapping.address, reservation.address + g, 8)
        with pytest.raises(IllegalAddressError, match="not inside one reservation"):
            device.memset(reservation.address - 4096, 0, 8)
        buffer = bytearray(8)
        with pytest.raises(InvalidArgumentError, match="writable"):
            device.copy_device_to_host(b"readonly", mapping.address)
        device.memset(mapping.address, 0xEE, g)
        device.copy_device_to_host(buffer, mapping.address)
        assert buffer == b"\xee" * 8


def test_close_is_idempotent_and_device_close_returns_everything(device: Device):
    g = device.granularity
    reservation = device.reserve(3 * g)
    pages = [device.create_page() for _ in range(3)]
    mappings = [device.map(reservation, i * g, p) for i, p in enumerate(pages)]
    device.set_access(reservation, 0, 3 * g)
    exported = pages[0].export()
    mappings[0].close()
    mappings[0].close()
    pages[0].close()
    pages[0].close()
    exported.close()
    exported.close()
    with pytest.raises(ClosedError):
        device.map(reservation, 0, pages[0])
    reservation.close()  # unmaps the two remaining mappings
    assert all(m.closed for m in mappings)
    device.close()
    device.close()
    assert all(p.closed for p in pages)
    with pytest.raises(ClosedError):
        device.reserve(g)


def test_no_leak_of_fds_mappings_or_driver_objects_after_1000_cycles(device: Device):
    g = device.granularity
    proc = psutil.Process()

    def cycle(i: int) -> None:
        reservation = device.reserve(2 * g)
        page = device.create_page()
        mapping = device.map(reservation, g, page)
        device.set_access(reservation, g, g)
        device.memset(mapping.address, i & 0xFF, 64)
        assert device.read(mapping.address + 63, 1)[0] == i & 0xFF
        if i % 10 == 0:
            page.export().close()
        mapping.close()
        page.close()
        reservation.close()

    cycle(0)  # first-use allocations (interpreter, driver) happen before the baseline
    fds, maps = proc.num_fds(), len(proc.memory_maps(grouped=False))
    info = device.memory_info()
    for i in range(1, 1001):
        cycle(i)
    assert proc.num_fds() == fds
    assert len(proc.memory_maps(grouped=False)) == maps
    if device.kind == "cuda":
        assert device.memory_info() == info
    if device.kind == "cuda" and FAKE is not None:
        assert FAKE.counter("live.handles") == 0 and FAKE.counter("live.mappings") == 0


def test_a_new_thread_can_use_the_device(device: Device):
    """The primary context is made current in whichever thread calls (the fake enforces it)."""
    g = device.granularity
    reservation = device.reserve(g)
    errors: list[BaseException] = []
    made: list = []

    def grow() -> None:
        try:
            page = device.create_page()
            made.append(page)
            device.map(reservation, 0, page)
            device.set_access(reservation, 0, g)
            device.memset(reservation.address, 0x42, g)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=grow)
    thread.start()
    thread.join()
    assert errors == []
    assert device.read(reservation.address, 4) == b"\x42" * 4
    made[0].close()
    reservation.close()


@pytest.mark.parametrize("kind", ["host", "cuda"])
def test_touching_a_mapping_before_set_access_faults(kind: str):
    if kind == "cuda" and REAL_CUDA:
        pytest.skip("the CPU cannot read GPU memory; tests/test_gpu_paths.py faults a GPU access instead")
    denied = subprocess.run([sys.executable, CHILD, "touch", kind, "none"], capture_output=True, timeout=120)
    assert denied.returncode == -signal.SIGSEGV
    allowed = subprocess.run(
        [sys.executable, CHILD, "touch", kind, "read"], capture_output=True, text=True, timeout=120
    )
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() == "read 0"


def test_import_refuses_a_descriptor_that_is_not_a_page(device: Device):
    g = device.granularity
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(InvalidArgumentError):
            device.import_page(read_end, g)
    finally:
        os.close(read_end)
        os.close(write_end)
    closed_fd = os.dup(0)
    os.close(closed_fd)
    with pytest.raises(InvalidArgumentError):
        device.import_page(closed_fd, g)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_import_pages_is_all_or_nothing_and_consume_owns_the_descriptors(device: Device):
    """A batch import with one bad descriptor imports nothing (the pages before it are released); without
    `consume` the caller keeps every descriptor, with it the device closes them all, also on failure; and
    the descriptors of a consumed batch are closed once its pages are."""
    g = device.granularity
    sources = [device.create_page(), device.create_page()]
    read_end, write_end = os.pipe()
    try:
        kept = [sources[0].export().detach(), read_end]
        with pytest.raises(InvalidArgumentError):
            device.import_pages(kept, g)
        assert all(fd_is_open(fd) for fd in kept)  # still the caller's
        os.close(kept[0])

        given = [sources[0].export().detach(), read_end, sources[1].export().detach()]
        with pytest.raises(InvalidArgumentError):
            device.import_pages(given, g, consume=True)
        assert not any(fd_is_open(fd) for fd in given)  # the device closed the bad one too

        given = [p.export().detach() for p in sources]
        imported = device.import_pages(given, g, consume=True)
        assert [p.imported for p in imported] == [True, True]
        reservation = device.reserve(2 * g)
        mappings = [device.map(reservation, i * g, page) for i, page in enumerate(imported)]
        device.set_access(reservation, 0, 2 * g)
        device.memset(mappings[1].address, 0x5A, g)
        for mapping in mappings:
            mapping.close()
        reservation.close()
        for page in imported:
            page.close()
        assert not any(fd_is_open(fd) for fd in given)
    finally:
        os.close(write_end)
        for page in sources:
            page.close()


def test_host_buffer_round_trip_through_a_page_and_idempotent_close(device: Device):
    g = device.granularity
    reservation = device.reserve(g)
    page = device.create_page()
    mapping = device.map(reservation, 0, page)
    device.set_access(reservation, 0, g)
    staging = device.allocate_host_buffer(2 * g)
    data = os.urandom(g)
    staging.view(g, g)[:] = memoryview(data)
    device.copy_host_to_device(reservation.address, staging.view(g, g))
    device.copy_device_to_host(staging.view(0, g), reservation.address)
    assert staging.view(0, g).tobytes() == data
    with pytest.raises(InvalidArgumentError, match="outside the"):
        staging.view(g, g + 1)
    with pytest.raises(InvalidArgumentError, match="positive integer"):
        device.allocate_host_buffer(0)
    if device.kind == "cuda" and FAKE is not None:
        assert FAKE.counter("live.host_allocations") == 1
    staging.close()
    staging.close()
    with pytest.raises(ClosedError):
        staging.view(0, 1)
    leftover = device.allocate_host_buffer(g)  # freed by the device's own close
    mapping.close()
    page.close()
    reservation.close()
    device.close()
    assert leftover.closed


def test_batched_copies_round_trip_many_pages_exactly_and_check_every_range_first(device: Device):
    g = device.granularity
    n = 12
    reservation = device.reserve(n * g)
    pages = [device.create_page() for _ in range(n)]
    mappings = [device.map(reservation, i * g, page) for i, page in enumerate(pages)]
    device.set_access(reservation, 0, n * g)
    chunks = [device.allocate_host_buffer(g) for _ in range(n)]
    data = [os.urandom(g) for _ in range(n)]
    for chunk, payload in zip(chunks, data, strict=True):
        chunk.array[:] = memoryview(payload)
    # Page i gets chunk n-1-i: a reordering shows up as wrong bytes.
    device.copy_host_to_device_many([(reservation.address + i * g, chunks[n - 1 - i].array) for i in range(n)])
    for i in range(n):
        assert device.read(reservation.address + i * g, g) == data[n - 1 - i]
    out = [device.allocate_host_buffer(g) for _ in range(n)]
    device.copy_device_to_host_many([(out[i].array, reservation.address + i * g) for i in range(n)])
    assert [o.array.tobytes() for o in out] == [data[n - 1 - i] for i in range(n)]

    # One range past the mapped pages: refused before any copy, nothing written.
    mappings[-1].close()
    for o in out:
        o.array[:] = 0
    with pytest.raises(IllegalAddressError, match="not mapped"):
        device.copy_device_to_host_many([(out[i].array, reservation.address + i * g) for i in range(n)])
    assert all(not o.array.any() for o in out)
    with pytest.raises(IllegalAddressError):
        device.copy_host_to_device_many([(reservation.address + (n - 1) * g, chunks[0].array)])
    assert device.copies_in_flight == 0  # a refused batch leaves nothing busy
    for mapping in mappings[:-1]:
        mapping.close()
    for page in pages:
        page.close()
    reservation.close()


def test_an_unmap_or_a_free_waits_for_a_batched_copy_in_flight(device: Device):
    """Batched copies run without the device lock; the mapping they read and the host buffer they
    write stay busy until the batch is over. If the unmap did not wait, the copy would read an
    unmapped page (a crash on both backends); the bytes must come out whole."""
    g = device.granularity
    reservation = device.reserve(g)
    page = device.create_page()
    mapping = device.map(reservation, 0, page)
    device.set_access(reservation, 0, g)
    payload = os.urandom(g)
    device.copy_host_to_device(reservation.address, payload)
    target = device.allocate_host_buffer(g)
    errors: list[BaseException] = []
    repeats = 256  # the same page copied this many times: a batch that lasts long enough to be seen
    for _ in range(3):  # 256, 1024, then 4096 copies of the page (at most 8 GiB copied)
        copies = [(target.array, reservation.address)] * repeats
        batch = threading.Thread(target=_record, args=(errors, device.copy_device_to_host_many, copies))
        batch.start()
        while batch.is_alive() and not device.copies_in_flight:
            pass
        seen = device.copies_in_flight > 0
        if seen:
            mapping.close()  # waits for the batch
            assert device.copies_in_flight == 0
            assert target.array.tobytes() == payload
            target.close()  # nothing in flight: at once
        batch.join()
        if seen:
            break
        repeats *= 4  # it finished before this thread looked: try a longer batch
    assert seen, "the batched copy was never seen in flight"
    assert errors == []
    page.close()
    reservation.close()


def _record(errors: list[BaseException], call, *args) -> None:
    try:
        call(*args)
    except BaseException as exc:
        errors.append(exc)
