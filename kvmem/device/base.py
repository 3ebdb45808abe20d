"""The device interface: virtual reservations, physical pages, mappings, access, copies.

Design note
-----------
kvmem builds elastic memory out of four resources, mirroring the CUDA driver's virtual-memory
(VMM) API: a *reservation* of virtual addresses, a *physical page* of memory, a *mapping* of a
page at an offset of a reservation, and an *exported handle* (a POSIX file descriptor) through
which another process can import the same page. Two backends implement it: `CudaDevice` (GPU
memory through `cuda.bindings.driver`) and `HostDevice` (host RAM through memfd and mmap).

Each resource object owns exactly one resource, is made only by a `Device` factory method
(`reserve`, `create_page`, `import_page`, `map`, `PhysicalPage.export`), and has a `close()` that
is safe to call twice; all are context managers. A reservation closed with live mappings unmaps
them first. `Device.close()` closes whatever the device made that is still open.

The base class keeps the bookkeeping both backends need (which ranges of which reservation are
mapped, with what access) and validates every argument against it *before* any driver call:
misaligned sizes and offsets, ranges outside a reservation, a second mapping over a mapped range,
and memsets or copies on ranges that are not mapped with the right access are refused with a
typed exception. On a GPU the last would otherwise fault the context for good (a sticky
CUDA_ERROR_ILLEGAL_ADDRESS); on the host it would kill the process with SIGSEGV.

Thread safety: one re-entrant lock per device guards the bookkeeping and the backend call it
describes, so a background thread may map while another unmaps. Memsets and copies hold the lock
too, so memory cannot be unmapped under a copy that was validated against it. The batched copies
(`copy_device_to_host_many`, `copy_host_to_device_many`) are the one exception: they validate
under the lock, then copy without it so that several batches run at once (a page's copy overlaps
another thread's mapping work); while a batch is in flight its mappings and host buffers are
*busy*: an unmap, an access change or a free of any of them waits until the batch is over. A host
buffer is allocated without the lock too (pinning is slow); `close` waits for it.

Synchronization rule: unmapping does not wait for GPU work that still reads or writes the range
(neither cuMemUnmap nor cuMemRelease synchronize). Whoever unmaps must first synchronize the
work that could touch the range; see `Mapping.close`.
"""

from __future__ import annotations

import bisect
import ctypes
import enum
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvmem.common.protocol import close_fds
from kvmem.common.undo import Undo
from kvmem.device.errors import (
    AlreadyMappedError,
    ClosedError,
    IllegalAddressError,
    InvalidArgumentError,
)

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)


class Access(enum.IntEnum):
    """Access granted on a mapped range. Values are CUDA's CU_MEM_ACCESS_FLAGS_PROT_*."""

    NONE = 0
    READ = 1
    READ_WRITE = 3


@dataclass(frozen=True)
class MemoryInfo:
    """Device memory in bytes: what is free now and the device's total."""

    free: int
    total: int


class ExportedHandle:
    """A POSIX file descriptor through which another process can import a physical page.

    Made by `PhysicalPage.export()`. Owns the descriptor until `close()` or `detach()`.
    """

    def __init__(self, fd: int, size: int):
        self._fd: int | None = fd
        self.size = size

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ClosedError("exported handle is closed or detached")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def detach(self) -> int:
        """Give up ownership: return the descriptor, which the caller must close."""
        fd = self.fd
        self._fd = None
        return fd

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __del__(self) -> None:
        # A descriptor is the one resource the interpreter can reclaim safely without the device.
        if getattr(self, "_fd", None) is not None:
            self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ExportedHandle(fd={self._fd}, size={self.size})"


class PhysicalPage:
    """Physical memory of `size` bytes. Made by `Device.create_page` or `Device.import_page`.

    Closing releases the page; memory that is still mapped stays alive until its last mapping is
    unmapped, as with cuMemRelease.
    """

    def __init__(self, device: Device, handle: Any, size: int, imported: bool):
        self.device = device
        self.size = size
        self.imported = imported
        self._handle = handle
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def handle(self) -> Any:
        """The backend's handle (a CUmemGenericAllocationHandle, or a host allocation)."""
        if self._closed:
            raise ClosedError("physical page is closed")
        return self._handle

    def export(self) -> ExportedHandle:
        """Export the page as a POSIX file descriptor that another process can import."""
        return self.device._export_page(self)

    def close(self) -> None:
        self.device._release_page(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"PhysicalPage(size={self.size}, imported={self.imported}, {state})"


class Mapping:
    """A physical page mapped at `offset` of a reservation. Made by `Device.map`.

    A new mapping has no access: call `Device.set_access` before touching it.
    """

    def __init__(self, reservation: Reservation, offset: int, page: PhysicalPage):
        self.reservation = reservation
        self.offset = offset
        self.page = page
        self.size = page.size
        self.access = Access.NONE
        self._closed = False

    @property
    def address(self) -> int:
        return self.reservation.address + self.offset

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unmap the page; the range becomes reserved-but-unmapped again.

        Synchronization: this does not wait for device work that may still read or write the
        range (cuMemUnmap does not). The caller synchronizes that work first, e.g. with
        `Device.synchronize()` or a stream synchronize of every stream that used the range.
        """
        self.reservation.device._unmap(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Mapping(address={self.address:#x}, size={self.size}, access={self.access.name})"


class Reservation:
    """A reserved virtual address range `[address, address + size)`. Made by `Device.reserve`."""

    def __init__(self, device: Device, address: int, size: int):
        self.device = device
        self.address = address
        self.size = size
        self._closed = False
        # Invariant: _offsets is sorted and _offsets[i] == _mappings[i].offset; mappings never
        # overlap.
        self._offsets: list[int] = []
        self._mappings: list[Mapping] = []

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def end(self) -> int:
        return self.address + self.size

    def mapping_at(self, offset: int) -> Mapping | None:
        """The mapping that covers `offset`, if any."""
        with self.device._lock:
            i = bisect.bisect_right(self._offsets, offset) - 1
            if i >= 0 and offset < self._offsets[i] + self._mappings[i].size:
                return self._mappings[i]
            return None

    def close(self) -> None:
        """Unmap what is still mapped (see `Mapping.close` on synchronization), then free."""
        self.device._free_reservation(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Reservation(address={self.address:#x}, size={self.size}, mappings={len(self._mappings)})"


class HostBuffer:
    """Host memory of `size` bytes to copy device data into and out of. Made by `Device.allocate_host_buffer`.

    Page-locked (pinned) on CUDA, so device copies run at full bandwidth and need no staging;
    ordinary anonymous memory on the host device. `array` is a flat uint8 view, valid until
    `close()`, which frees the memory (idempotent; the device frees what is left when it closes).
    """

    def __init__(self, device: Device, address: int, size: int):
        self.device = device
        self.address = address
        self.size = size
        self._closed = False
        self.array: np.ndarray | None = np.ctypeslib.as_array((ctypes.c_ubyte * size).from_address(address))

    @property
    def closed(self) -> bool:
        return self._closed

    def view(self, offset: int, size: int) -> np.ndarray:
        """Bytes `[offset, offset + size)` of the buffer, as a uint8 array (no copy)."""
        if self._closed or self.array is None:
            raise ClosedError("host buffer is closed")
        if offset < 0 or size < 0 or offset + size > self.size:
            raise InvalidArgumentError(f"range [{offset}, {offset + size}) is outside the {self.size}-byte buffer")
        return self.array[offset : offset + size]

    def close(self) -> None:
        self.device._free_host_buffer(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HostBuffer(address={self.address:#x}, size={self.size})"


def _host_buffer(buffer: Any, writable: bool) -> np.ndarray:
    """A flat uint8 view of a contiguous host buffer (bytes, bytearray, numpy, memoryview)."""
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise InvalidArgumentError("host buffer must be C-contiguous")
    if writable and view.readonly:
        raise InvalidArgumentError("host buffer must be writable")
    return np.frombuffer(view.cast("B"), dtype=np.uint8)


class Device(ABC):
    """One device's memory through the VMM primitives; see the module docstring.

    Attributes:
        kind: ``"cuda"`` or ``"host"``.
        ordinal: The device index (the GPU ordinal; 0 for host memory).
        granularity: The allocation granularity in bytes. Page sizes, reservation sizes and
            mapping offsets are multiples of it.
        name: A human-readable device name.
        uuid: The GPU's UUID as nvidia-smi writes it (``GPU-8c4b...``): what identifies the
            physical GPU whatever ordinal CUDA_VISIBLE_DEVICES gives it. None for host memory.
        zeroes_new_pages: Whether `create_page` returns memory that reads as zeros.
    """

    kind: str
    ordinal: int
    granularity: int
    name: str
    uuid: str | None = None
    # Whether a new page is guaranteed to read as zeros. cuMemCreate makes no such promise.
    zeroes_new_pages: bool = False

    def __init__(self) -> None:
        self._lock = threading.RLock()
        # Notified whenever a batched copy or a host allocation ends (see the module docstring);
        # waits release `_lock`.
        self._copies_done = threading.Condition(self._lock)
        # Batched copies in flight: id -> (ids of the mappings they touch, host ranges [lo, hi)).
        self._in_flight: dict[int, tuple[set[int], list[tuple[int, int]]]] = {}
        self._next_batch = 0
        self._host_allocations = 0  # host buffers being allocated (without the lock)
        self._closed = False
        # Reservations by base address; _bases is sorted for address lookups.
        self._bases: list[int] = []
        self._reservations: dict[int, Reservation] = {}
        self._pages: dict[int, PhysicalPage] = {}  # id(page) -> page, the open ones
        self._host_buffers: dict[int, HostBuffer] = {}  # by address, the open ones

    # ---- backend primitives (called with the lock held, arguments validated) ----

    @abstractmethod
    def _backend_memory_info(self) -> MemoryInfo: ...

    @abstractmethod
    def _backend_reserve(self, size: int, alignment: int) -> int: ...

    @abstractmethod
    def _backend_free(self, address: int, size: int) -> None: ...

    @abstractmethod
    def _backend_create(self, size: int) -> Any:
        """A new physical allocation. Called WITHOUT the device lock (several threads create at once,
        see `create_page`): it must guard any state of its own."""

    @abstractmethod
    def _backend_enter(self) -> None:
        """Prepare the calling thread for the backend calls that follow (only `_backend_import` relies on it)."""

    @abstractmethod
    def _backend_import(self, fd: int, size: int, consume: bool) -> Any:
        """Import `fd` (after `_backend_enter`).

        With `consume` and on success the backend owns `fd`; on failure the caller still does.
        """

    @abstractmethod
    def _backend_export(self, handle: Any, size: int) -> int: ...

    @abstractmethod
    def _backend_release(self, handle: Any) -> None: ...

    @abstractmethod
    def _backend_map(self, address: int, size: int, handle: Any) -> None: ...

    @abstractmethod
    def _backend_unmap(self, address: int, size: int, handle: Any) -> None: ...

    @abstractmethod
    def _backend_set_access(self, address: int, size: int, access: Access) -> None: ...

    @abstractmethod
    def _backend_memset(self, address: int, value: int, size: int) -> None: ...

    @abstractmethod
    def _backend_copy_dtod(self, dst: int, src: int, size: int) -> None: ...

    @abstractmethod
    def _backend_copy_htod(self, dst: int, src_host: int, size: int) -> None: ...

    @abstractmethod
    def _backend_copy_dtoh(self, dst_host: int, src: int, size: int) -> None: ...

    @abstractmethod
    def _backend_host_alloc(self, size: int) -> int: ...

    @abstractmethod
    def _backend_host_free(self, address: int, size: int) -> None: ...

    @abstractmethod
    def _backend_synchronize(self) -> None: ...

    @abstractmethod
    def _backend_close(self) -> None: ...

    # ---- public interface ----

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def copies_in_flight(self) -> int:
        """Batched copies running now (`copy_device_to_host_many`, `copy_host_to_device_many`)."""
        return len(self._in_flight)

    def memory_info(self) -> MemoryInfo:
        """Free and total device memory in bytes."""
        with self._lock:
            self._check_open()
            return self._backend_memory_info()

    def reserve(self, size: int, alignment: int = 0) -> Reservation:
        """Reserve `size` bytes of virtual address space (no memory behind it yet).

        Args:
            size: A positive multiple of `granularity`.
            alignment: 0 (the granularity) or a power of two for the base address.
        """
        self._check_size("reservation size", size)
        if alignment < 0 or (alignment & (alignment - 1)) != 0:
            raise InvalidArgumentError(f"alignment {alignment} is not 0 or a power of two")
        with self._lock:
            self._check_open()
            address = self._backend_reserve(size, alignment)
            reservation = Reservation(self, address, size)
            bisect.insort(self._bases, address)
            self._reservations[address] = reservation
            return reservation

    def create_page(self, size: int | None = None) -> PhysicalPage:
        """Create a physical page of `size` bytes (default: one granule).

        Raises:
            OutOfMemoryError: The device has no memory left; the device stays usable.
        """
        size = self.granularity if size is None else size
        self._check_size("page size", size)
        with self._lock:
            self._check_open()
        # The allocation runs without the device lock, so that several threads create pages at
        # once (the daemon's pool creates in parallel: kvmemd.pool). It touches none of the
        # bookkeeping; the new page is registered below. CUDA driver calls on distinct objects
        # may run concurrently from several threads: the driver API reference singles out graph
        # objects as the ones that are not internally synchronized (CUDA Driver API, "Graph object
        # thread safety"), and cuda.core's "Concurrency and Thread Safety" page allows any
        # concurrent use of distinct objects, subject to shared driver state (a new allocation
        # shares none with others). No per-call statement for cuMemCreate was found.
        handle = self._backend_create(size)
        with self._lock:
            if self._closed:  # closed meanwhile: nothing may outlive the device
                self._backend_release(handle)
                raise ClosedError(f"{type(self).__name__} was closed while a page was being created")
            page = PhysicalPage(self, handle, size, imported=False)
            self._pages[id(page)] = page
            return page

    def import_page(self, fd: int, size: int) -> PhysicalPage:
        """Import a page another process exported as file descriptor `fd` of `size` bytes.

        The caller keeps ownership of `fd` (close it after importing), as with
        cuMemImportFromShareableHandle.
        """
        return self.import_pages([fd], size)[0]

    def import_pages(self, fds: Sequence[int], size: int, *, consume: bool = False) -> list[PhysicalPage]:
        """Import one page of `size` bytes per descriptor in `fds`, in order, all or nothing.

        If an import fails, the pages imported before it are released and the error is raised.
        Without `consume` the caller keeps ownership of `fds`, as with
        cuMemImportFromShareableHandle. With `consume` the descriptors become the device's, also
        when this raises: a host page keeps its descriptor as the page (no dup, no close: two
        system calls fewer per page of a grant), a CUDA page closes it once imported.
        """
        for fd in fds:
            if not isinstance(fd, int) or fd < 0:
                if consume:
                    close_fds([f for f in fds if isinstance(f, int) and f >= 0])
                raise InvalidArgumentError(f"file descriptor {fd!r} is not a non-negative integer")
        pages: list[PhysicalPage] = []
        with self._lock, Undo() as undo:
            if consume:  # descriptors not yet taken over by a page are closed on failure
                undo.push(lambda: close_fds(fds[len(pages) :]))
            self._check_size("page size", size)
            self._check_open()
            self._backend_enter()
            for fd in fds:
                handle = self._backend_import(fd, size, consume)
                page = PhysicalPage(self, handle, size, imported=True)
                self._pages[id(page)] = page
                pages.append(page)
                undo.push(self._release_page, page)
        return pages

    def map(self, reservation: Reservation, offset: int, page: PhysicalPage) -> Mapping:
        """Map `page` at `offset` of `reservation`. The mapping starts with no access."""
        with self._lock:
            self._check_open()
            self._check_reservation(reservation)
            if page.device is not self:
                raise InvalidArgumentError("page belongs to another device")
            if page.closed:
                raise ClosedError("cannot map a closed page")
            self._check_offset(offset)
            if offset + page.size > reservation.size:
                raise InvalidArgumentError(
                    f"mapping [{offset:#x}, {offset + page.size:#x}) does not fit in a reservation "
                    f"of {reservation.size:#x} bytes"
                )
            i = bisect.bisect_left(reservation._offsets, offset)
            prev_overlaps = i > 0 and reservation._mappings[i - 1].offset + reservation._mappings[i - 1].size > offset
            next_overlaps = i < len(reservation._offsets) and reservation._offsets[i] < offset + page.size
            if prev_overlaps or next_overlaps:
                raise AlreadyMappedError(
                    f"range [{offset:#x}, {offset + page.size:#x}) of the reservation at "
                    f"{reservation.address:#x} is already mapped"
                )
            self._backend_map(reservation.address + offset, page.size, page.handle)
            mapping = Mapping(reservation, offset, page)
            reservation._offsets.insert(i, offset)
            reservation._mappings.insert(i, mapping)
            return mapping

    def set_access(self, reservation: Reservation, offset: int, size: int, access: Access = Access.READ_WRITE) -> None:
        """Grant `access` on `[offset, offset + size)` of `reservation` in one call.

        The range must be made of whole, adjacent mappings; one call may cover many pages (one
        cuMemSetAccess per contiguous run is far cheaper than one per page).
        """
        access = Access(access)
        self._check_size("access range size", size)
        with self._lock:
            while True:  # checked again after each wait: the lock was released meanwhile
                self._check_open()
                self._check_reservation(reservation)
                self._check_offset(offset)
                covered = self._whole_mappings(reservation, offset, size)
                if not self._busy(mappings={id(m) for m in covered}):
                    break
                self._copies_done.wait()
            self._backend_set_access(reservation.address + offset, size, access)
            for mapping in covered:
                mapping.access = access

    def memset(self, address: int, value: int, size: int) -> None:
        """Set `size` bytes at device `address` to `value` (0..255)."""
        if not 0 <= value <= 255:
            raise InvalidArgumentError(f"memset value {value} is not a byte (0..255)")
        with self._lock:
            self._check_open()
            self._check_device_range(address, size, Access.READ_WRITE)
            if size:
                self._backend_memset(address, value, size)

    def copy_device_to_device(self, dst: int, src: int, size: int) -> None:
        """Copy `size` bytes between two device addresses of this device."""
        with self._lock:
            self._check_open()
            self._check_device_range(src, size, Access.READ)
            self._check_device_range(dst, size, Access.READ_WRITE)
            if size:
                self._backend_copy_dtod(dst, src, size)

    def copy_host_to_device(self, dst: int, src: Any) -> None:
        """Copy the bytes of host buffer `src` (any C-contiguous buffer) to device `dst`."""
        host = _host_buffer(src, writable=False)
        with self._lock:
            self._check_open()
            self._check_device_range(dst, host.nbytes, Access.READ_WRITE)
            if host.nbytes:
                self._backend_copy_htod(dst, host.ctypes.data, host.nbytes)

    def copy_device_to_host(self, dst: Any, src: int) -> None:
        """Fill writable host buffer `dst` with the bytes at device address `src`."""
        host = _host_buffer(dst, writable=True)
        with self._lock:
            self._check_open()
            self._check_device_range(src, host.nbytes, Access.READ)
            if host.nbytes:
                self._backend_copy_dtoh(host.ctypes.data, src, host.nbytes)

    def copy_device_to_host_many(self, copies: Sequence[tuple[Any, int]]) -> None:
        """Fill each writable host buffer ``dst`` with the bytes at device address ``src``, for
        every ``(dst, src)`` of `copies`: several pages in one call.

        Every range is checked before any copy starts (a bad one raises and nothing is copied).
        The copies then run without the device lock, so other threads' device calls (and another
        batch) proceed meanwhile; the mappings and host buffers involved stay busy until the
        batch is over (unmapping, changing access or freeing them waits). Each copy is over when
        this returns: on CUDA each is a synchronous cuMemcpyDtoH into (pinned) host memory.
        """
        hosts = [(_host_buffer(dst, writable=True), src) for dst, src in copies]
        batch = self._start_batch([(src, host.nbytes) for host, src in hosts], [h for h, _ in hosts], Access.READ)
        try:
            for host, src in hosts:
                if host.nbytes:
                    self._backend_copy_dtoh(host.ctypes.data, src, host.nbytes)
        finally:
            self._end_batch(batch)

    def copy_host_to_device_many(self, copies: Sequence[tuple[int, Any]]) -> None:
        """Copy host buffer ``src`` to device address ``dst``, for every ``(dst, src)`` of `copies`.

        The same contract as `copy_device_to_host_many` (checked first, copied without the
        device lock, the ranges busy meanwhile); on CUDA each is a synchronous cuMemcpyHtoD.
        """
        hosts = [(dst, _host_buffer(src, writable=False)) for dst, src in copies]
        batch = self._start_batch([(dst, host.nbytes) for dst, host in hosts], [h for _, h in hosts], Access.READ_WRITE)
        try:
            for dst, host in hosts:
                if host.nbytes:
                    self._backend_copy_htod(dst, host.ctypes.data, host.nbytes)
        finally:
            self._end_batch(batch)

    def allocate_host_buffer(self, size: int) -> HostBuffer:
        """Host memory of `size` bytes for copies with this device (pinned on CUDA).

        Raises:
            OutOfMemoryError: The host has no memory left for it.
        """
        if not isinstance(size, int) or size <= 0:
            raise InvalidArgumentError(f"host buffer size {size!r} must be a positive integer")
        # Made without the lock: cuMemHostAlloc pins every page of the buffer, which takes long,
        # and the lock would hold up every other thread's device work meanwhile (a daemon's page
        # creation, its other copy worker). `close` waits for allocations under way.
        with self._lock:
            self._check_open()
            self._host_allocations += 1
        try:
            with Undo() as undo:
                address = self._backend_host_alloc(size)
                undo.push(self._backend_host_free, address, size)
                with self._lock:
                    buffer = HostBuffer(self, address, size)
                    self._host_buffers[address] = buffer
        finally:
            with self._lock:
                self._host_allocations -= 1
                self._copies_done.notify_all()
        return buffer

    def read(self, address: int, size: int) -> bytes:
        """Return `size` bytes at device `address` (a convenience over `copy_device_to_host`)."""
        out = bytearray(size)
        self.copy_device_to_host(out, address)
        return bytes(out)

    def synchronize(self) -> None:
        """Wait for all work on the device that this process issued."""
        with self._lock:
            self._check_open()
            self._backend_synchronize()

    def close(self) -> None:
        """Close everything this device made that is still open, then the device. Idempotent."""
        with self._lock:
            # No memory may go away under a batched copy, nor the context under an allocation.
            while (self._in_flight or self._host_allocations) and not self._closed:
                self._copies_done.wait()
            if self._closed:
                return
            self._backend_synchronize()
            for address in list(self._bases):
                self._free_reservation(self._reservations[address])
            for page in list(self._pages.values()):
                self._release_page(page)
            for buffer in list(self._host_buffers.values()):
                self._free_host_buffer(buffer)
            self._backend_close()
            self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ordinal={self.ordinal}, granularity={self.granularity})"

    # ---- resource teardown, called by the resource objects ----

    def _export_page(self, page: PhysicalPage) -> ExportedHandle:
        with self._lock:
            self._check_open()
            return ExportedHandle(self._backend_export(page.handle, page.size), page.size)

    def _release_page(self, page: PhysicalPage) -> None:
        with self._lock:
            if page._closed:
                return
            self._backend_release(page._handle)
            page._closed = True
            self._pages.pop(id(page), None)

    def _unmap(self, mapping: Mapping) -> None:
        with self._lock:
            while not mapping._closed and self._busy(mappings={id(mapping)}):
                self._copies_done.wait()
            if mapping._closed:
                return
            reservation = mapping.reservation
            self._backend_unmap(mapping.address, mapping.size, mapping.page._handle)
            i = bisect.bisect_left(reservation._offsets, mapping.offset)
            del reservation._offsets[i]
            del reservation._mappings[i]
            mapping._closed = True

    def _free_host_buffer(self, buffer: HostBuffer) -> None:
        with self._lock:
            while not buffer._closed and self._busy(host=(buffer.address, buffer.address + buffer.size)):
                self._copies_done.wait()
            if buffer._closed:
                return
            buffer.array = None  # views taken earlier must not be used after this
            self._backend_host_free(buffer.address, buffer.size)
            buffer._closed = True
            del self._host_buffers[buffer.address]

    def _free_reservation(self, reservation: Reservation) -> None:
        with self._lock:
            if reservation._closed:
                return
            for mapping in list(reversed(reservation._mappings)):
                self._unmap(mapping)  # may wait for a batched copy, the lock released meanwhile
            if reservation._closed:  # closed by another thread while this one waited
                return
            self._backend_free(reservation.address, reservation.size)
            reservation._closed = True
            self._bases.remove(reservation.address)
            del self._reservations[reservation.address]

    # ---- batched copies in flight ----

    def _start_batch(self, ranges: list[tuple[int, int]], hosts: list[np.ndarray], need: Access) -> int:
        """Check every device range of a batched copy and mark its mappings and host buffers busy."""
        with self._lock:
            self._check_open()
            mappings: set[int] = set()
            for address, size in ranges:
                mappings.update(id(m) for m in self._check_device_range(address, size, need))
            host_ranges = [(h.ctypes.data, h.ctypes.data + h.nbytes) for h in hosts if h.nbytes]
            batch = self._next_batch
            self._next_batch += 1
            self._in_flight[batch] = (mappings, host_ranges)
            return batch

    def _end_batch(self, batch: int) -> None:
        with self._lock:
            del self._in_flight[batch]
            self._copies_done.notify_all()

    def _busy(self, mappings: Collection[int] = (), host: tuple[int, int] | None = None) -> bool:
        """Whether a batched copy in flight touches `mappings` (ids) or overlaps the host range
        `host` (called with the lock held). A caller that must wait uses ``_copies_done.wait()``,
        which releases the lock, and checks its object again afterwards: it may have changed."""
        for touched, host_ranges in self._in_flight.values():
            if not touched.isdisjoint(mappings):
                return True
            if host is not None and any(lo < host[1] and host[0] < hi for lo, hi in host_ranges):
                return True
        return False

    # ---- validation ----

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")

    def _check_size(self, what: str, size: int) -> None:
        if not isinstance(size, int) or size <= 0 or size % self.granularity:
            raise InvalidArgumentError(
                f"{what} {size!r} is not a positive multiple of the granularity ({self.granularity} bytes)"
            )

    def _check_offset(self, offset: int) -> None:
        if not isinstance(offset, int) or offset < 0 or offset % self.granularity:
            raise InvalidArgumentError(
                f"offset {offset!r} is not a non-negative multiple of the granularity ({self.granularity} bytes)"
            )

    def _check_reservation(self, reservation: Reservation) -> None:
        if reservation.device is not self:
            raise InvalidArgumentError("reservation belongs to another device")
        if reservation.closed:
            raise ClosedError("reservation is closed")

    def _whole_mappings(self, reservation: Reservation, offset: int, size: int) -> list[Mapping]:
        """The mappings that exactly tile `[offset, offset + size)`, or InvalidArgumentError."""
        end = offset + size
        if end > reservation.size:
            raise InvalidArgumentError(
                f"range [{offset:#x}, {end:#x}) exceeds the reservation's {reservation.size:#x} bytes"
            )
        i = bisect.bisect_left(reservation._offsets, offset)
        covered: list[Mapping] = []
        cursor = offset
        while cursor < end and i < len(reservation._mappings) and reservation._offsets[i] == cursor:
            covered.append(reservation._mappings[i])
            cursor += reservation._mappings[i].size
            i += 1
        if cursor != end:
            raise InvalidArgumentError(
                f"range [{offset:#x}, {end:#x}) of the reservation is not made of whole mapped pages "
                f"(first gap or partial page at offset {cursor:#x})"
            )
        return covered

    def _check_device_range(self, address: int, size: int, need: Access) -> list[Mapping]:
        """Refuse a memset/copy range unless it is mapped with at least `need` access; the
        mappings that cover it."""
        if not isinstance(address, int) or not isinstance(size, int) or size < 0:
            raise InvalidArgumentError(f"bad device range: address={address!r} size={size!r}")
        if size == 0:
            return []
        i = bisect.bisect_right(self._bases, address) - 1
        reservation = self._reservations[self._bases[i]] if i >= 0 else None
        if reservation is None or address + size > reservation.end:
            raise IllegalAddressError(
                f"device range [{address:#x}, {address + size:#x}) is not inside one reservation of this device"
            )
        start = address - reservation.address
        end = start + size
        j = bisect.bisect_right(reservation._offsets, start) - 1
        cursor = start
        covered: list[Mapping] = []
        while cursor < end:
            if j < 0 or j >= len(reservation._mappings):
                break
            mapping = reservation._mappings[j]
            if not mapping.offset <= cursor < mapping.offset + mapping.size:
                break
            if (mapping.access & need) != need:
                raise IllegalAddressError(
                    f"device range at {reservation.address + cursor:#x} is mapped with access "
                    f"{mapping.access.name}, needs {need.name}: call set_access first"
                )
            covered.append(mapping)
            cursor = mapping.offset + mapping.size
            j += 1
        if cursor < end:
            raise IllegalAddressError(f"device address {reservation.address + cursor:#x} is not mapped")
        return covered
