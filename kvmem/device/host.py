"""`HostDevice`: the device interface over host RAM, with the same semantics as CUDA VMM.

- reservation = an anonymous ``PROT_NONE`` mapping with ``MAP_NORESERVE`` (address space only),
- physical page = a memfd named ``kvmem-page``, its memory committed at creation with
  ``posix_fallocate`` so that running out of memory shows at `create_page` (as
  `OutOfMemoryError`) and never later as a SIGBUS on first touch,
- map = ``mmap(MAP_SHARED | MAP_FIXED)`` of the memfd over the reservation, still ``PROT_NONE``,
- set access = ``mprotect``,
- unmap = the ``PROT_NONE`` anonymous reservation mapped back over the range,
- export / import = ``dup`` of the memfd, so another process maps the very same memory,
- mappings are ``MADV_DONTFORK``: a forked child does not inherit them.

A capacity (default: the machine's RAM) plays the part of device memory: pages are charged
against it at creation and uncharged when the page is released *and* unmapped, as with
cuMemRelease on a mapped allocation. Imported pages are not charged (their memory exists already).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
from dataclasses import dataclass

import psutil

from kvmem.device import _host_copy
from kvmem.device.base import Access, Device, MemoryInfo
from kvmem.device.errors import DeviceError, InvalidArgumentError, OutOfMemoryError

# Linux mmap constants (asm-generic; the same on x86_64 and aarch64). Python's mmap module lacks
# MAP_FIXED and MAP_NORESERVE.
_PROT_NONE, _PROT_READ, _PROT_WRITE = 0, 1, 2
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED = 0x01, 0x02, 0x10
_MAP_ANONYMOUS, _MAP_NORESERVE = 0x20, 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_DONTFORK = 10
_HUGE_PAGE = 2 << 20
_mprotect = _libc.mprotect
_mprotect.restype = ctypes.c_int
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

_PROT_FOR_ACCESS = {
    Access.NONE: _PROT_NONE,
    Access.READ: _PROT_READ,
    Access.READ_WRITE: _PROT_READ | _PROT_WRITE,
}

MEMFD_NAME = "kvmem-page"
DEFAULT_GRANULARITY = 2 << 20  # like a GPU's VMM granularity, and a transparent huge page


@functools.cache
def _memfd_device() -> int:
    """The st_dev that every memfd of this kernel reports."""
    fd = os.memfd_create("kvmem-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


def _os_error(call: str) -> DeviceError:
    err = ctypes.get_errno()
    cls = OutOfMemoryError if err in (errno.ENOMEM, errno.ENOSPC) else DeviceError
    return cls(f"{call} failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})", call=call)


@dataclass
class _HostAllocation:
    """One memfd page. `refs` counts the open page object plus one per mapping."""

    memfd: int
    size: int
    charged: bool
    refs: int = 1


class HostDevice(Device):
    """Device memory that is host RAM; see the module docstring.

    Args:
        capacity: Bytes of "device memory" (default: total RAM).
        granularity: Allocation granularity (default 2 MiB); a multiple of the OS page size.
    """

    kind = "host"
    zeroes_new_pages = True  # a memfd's pages are zero-filled by the kernel

    def __init__(self, capacity: int | None = None, granularity: int = DEFAULT_GRANULARITY):
        super().__init__()
        page = os.sysconf("SC_PAGE_SIZE")
        if granularity <= 0 or granularity % page:
            raise InvalidArgumentError(
                f"granularity {granularity} is not a positive multiple of the OS page size ({page})"
            )
        total = psutil.virtual_memory().total
        if capacity is not None and capacity <= 0:
            raise InvalidArgumentError(f"capacity {capacity} must be positive")
        self.ordinal = 0
        self.granularity = granularity
        self.capacity = total if capacity is None else capacity
        self.name = "host memory"
        self._charged = 0

    # The lock of the base class is held in every _backend_* call but `_backend_create`, and the copies
    # of the batched copies (Device.copy_device_to_host_many).

    def _backend_memory_info(self) -> MemoryInfo:
        free = min(self.capacity - self._charged, psutil.virtual_memory().available)
        return MemoryInfo(free=max(free, 0), total=self.capacity)

    def _backend_reserve(self, size: int, alignment: int) -> int:
        align = max(alignment, self.granularity)
        span = size + align
        raw = _mmap(None, span, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if raw == _MAP_FAILED or raw is None:
            raise _os_error("mmap(reserve)")
        base = (raw + align - 1) & ~(align - 1)
        if base > raw:
            _munmap(raw, base - raw)
        tail = base + size
        if raw + span > tail:
            _munmap(tail, raw + span - tail)
        return base

    def _backend_free(self, address: int, size: int) -> None:
        if _munmap(address, size) != 0:
            raise _os_error("munmap")

    def _backend_create(self, size: int) -> _HostAllocation:
        # Called without the device lock (Device.create_page): the capacity is charged under it,
        # first, and the memory is made outside it, so that threads creating pages zero them in
        # parallel (posix_fallocate zeroes the 2 MiB in the kernel, most of a creation's cost).
        with self._lock:
            if self._charged + size > self.capacity:
                raise OutOfMemoryError(
                    f"host device capacity exhausted: {self._charged} of {self.capacity} bytes in use, "
                    f"{size} more requested"
                )
            self._charged += size
        try:
            fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                os.posix_fallocate(fd, 0, size)
            except OSError:
                os.close(fd)
                raise
        except OSError as exc:
            with self._lock:
                self._charged -= size
            cls = OutOfMemoryError if exc.errno in (errno.ENOMEM, errno.ENOSPC) else DeviceError
            raise cls(f"memfd allocation of {size} bytes failed: {exc.strerror}") from exc
        return _HostAllocation(memfd=fd, size=size, charged=True)

    def _backend_enter(self) -> None:
        return  # host memory has no per-thread context to set up

    def _backend_import(self, fd: int, size: int, consume: bool) -> _HostAllocation:
        # Every memfd lives on the kernel's one internal shmem mount, so its st_dev tells a memfd
        # from a file, a pipe or a /dev/shm segment with one fstat. (A memfd's name proves
        # nothing: anyone may call theirs "kvmem-page".)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise InvalidArgumentError(f"file descriptor {fd} cannot be imported: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode) or st.st_dev != _memfd_device():
            raise InvalidArgumentError(f"file descriptor {fd} is not a kvmem host page (not a memfd)")
        if st.st_size != size:
            raise InvalidArgumentError(f"file descriptor {fd} holds {st.st_size} bytes, not the {size} expected")
        return _HostAllocation(memfd=fd if consume else os.dup(fd), size=size, charged=False)

    def _backend_export(self, handle: _HostAllocation, size: int) -> int:
        return os.dup(handle.memfd)

    def _backend_release(self, handle: _HostAllocation) -> None:
        os.close(handle.memfd)
        handle.memfd = -1
        self._unref(handle)

    def _backend_map(self, address: int, size: int, handle: _HostAllocation) -> None:
        got = _mmap(address, size, _PROT_NONE, _MAP_SHARED | _MAP_FIXED, handle.memfd, 0)
        if got != address:
            raise _os_error("mmap(map)")
        # A forked child must not keep the page mapped: once the page goes back to the pool it
        # may be scrubbed and lent to another tenant. (CUDA mappings are not inherited usefully
        # across fork either.)
        if _madvise(address, size, _MADV_DONTFORK) != 0:
            error = _os_error("madvise(MADV_DONTFORK)")
            _mmap(address, size, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE, -1, 0)
            raise error
        handle.refs += 1

    def _backend_unmap(self, address: int, size: int, handle: _HostAllocation) -> None:
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE
        if _mmap(address, size, _PROT_NONE, flags, -1, 0) != address:
            raise _os_error("mmap(unmap)")
        self._unref(handle)

    def _unref(self, handle: _HostAllocation) -> None:
        handle.refs -= 1
        if handle.refs == 0 and handle.charged:
            self._charged -= handle.size

    def _backend_set_access(self, address: int, size: int, access: Access) -> None:
        if _mprotect(address, size, _PROT_FOR_ACCESS[access]) != 0:
            raise _os_error("mprotect")

    def _backend_memset(self, address: int, value: int, size: int) -> None:
        ctypes.memset(address, value, size)

    def _backend_copy_dtod(self, dst: int, src: int, size: int) -> None:
        ctypes.memmove(dst, src, size)

    # Host and "device" memory never overlap, and these copies (a sleep's offload, a wake's restore:
    # a page at a time) are streamed: non-temporal stores (kvmem/device/_host_copy.c's design note).
    def _backend_copy_htod(self, dst: int, src_host: int, size: int) -> None:
        _host_copy.stream(dst, src_host, size)

    def _backend_copy_dtoh(self, dst_host: int, src: int, size: int) -> None:
        _host_copy.stream(dst_host, src, size)

    def _backend_host_alloc(self, size: int) -> int:
        # 2 MiB-aligned, so that a kernel giving transparent huge pages to all memory (THP
        # "always") can back it with them. Not advised for them (MADV_HUGEPAGE): with the kernel's
        # default defrag setting an advised fault waits for memory to be compacted into a huge
        # page, and on this machine (THP "madvise", defrag "madvise", much memory in the page
        # cache) the first offloading sleep of 1 GiB took 7.7-12 s with the advice and 0.9 s
        # without; 512 MiB of buffers took 0.9-1.4 s to allocate and touch advised, 0.4-0.5 s
        # not, and copies into them afterwards were no slower (benchmarks/README.md). A fault on
        # 4 KiB pages costs a bounded amount; a compaction stall does not.
        align = _HUGE_PAGE
        span = size + align
        raw = _mmap(None, span, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if raw == _MAP_FAILED or raw is None:
            raise _os_error("mmap(host buffer)")  # OutOfMemoryError on ENOMEM
        base = (raw + align - 1) & ~(align - 1)
        if base > raw:
            _munmap(raw, base - raw)
        if raw + span > base + size:
            _munmap(base + size, raw + span - base - size)
        return base

    def _backend_host_free(self, address: int, size: int) -> None:
        if _munmap(address, size) != 0:
            raise _os_error("munmap(host buffer)")

    def _backend_synchronize(self) -> None:
        # Host copies are synchronous: there is never outstanding work.
        return None

    def _backend_close(self) -> None:
        return None
