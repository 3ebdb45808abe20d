"""`CudaDevice`: the device interface over the CUDA driver's VMM API, via `cuda.bindings.driver`.

Facts this module depends on (checked against cuda-bindings 12.9 and 13.5):
- `cuda.bindings.driver` loads ``libcuda.so.1`` lazily on the first driver call, through
  `cuda.pathfinder`; without a driver that call raises `cuda.pathfinder.DynamicLibNotFoundError`
  (a RuntimeError), so importing this module never fails for lack of a GPU.
- Every call returns a tuple whose first item is a `CUresult`; `check()` turns a failure into
  a typed exception naming the call and the error.
- The driver needs a current context in the calling thread for memory calls. We retain the
  device's primary context (the one the CUDA runtime and torch use) and make it current in
  every thread before each call, so a background thread needs no set-up of its own.
- The export handle type must be passed as a `CUmemAllocationHandleType` enum, not an int.
- For POSIX file descriptors, cuMemImportFromShareableHandle takes the descriptor's value as the
  os handle, and does not take ownership of it.
- VMM support is the device attribute VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED; exporting pages as
  file descriptors also needs HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED.
"""

from __future__ import annotations

import os
from typing import Any

from kvmem.device.base import Access, Device, MemoryInfo
from kvmem.device.errors import (
    AlreadyMappedError,
    DeviceError,
    DeviceUnavailableError,
    IllegalAddressError,
    InvalidArgumentError,
    OutOfMemoryError,
)

try:
    from cuda.bindings import driver as cu
except ImportError:  # the bindings are a dependency, but a broken install must not break host use
    cu = None

_ERROR_TYPES: dict[str, type[DeviceError]] = {
    "CUDA_ERROR_OUT_OF_MEMORY": OutOfMemoryError,
    "CUDA_ERROR_ALREADY_MAPPED": AlreadyMappedError,
    "CUDA_ERROR_INVALID_VALUE": InvalidArgumentError,
    "CUDA_ERROR_ILLEGAL_ADDRESS": IllegalAddressError,
}


def _error_name(result: Any) -> tuple[str, str]:
    """The driver's name and description of a CUresult."""
    name = getattr(result, "name", None) or f"CUresult {int(result)}"
    description = ""
    try:
        err, text = cu.cuGetErrorString(result)
        if err == cu.CUresult.CUDA_SUCCESS and text:
            description = text.decode() if isinstance(text, bytes) else str(text)
    except RuntimeError:
        pass  # no description available; the name is enough
    return name, description


def check(call: str, returned: tuple) -> Any:
    """Return the value(s) of a driver call's result tuple, or raise for its CUresult.

    Args:
        call: The driver function's name, for the message.
        returned: What the binding returned: ``(CUresult,)`` or ``(CUresult, value, ...)``.

    Returns:
        None, the single value, or a tuple of values.

    Raises:
        OutOfMemoryError, AlreadyMappedError, InvalidArgumentError, IllegalAddressError for
        those CUresults; DeviceError for every other failure.
    """
    result, *values = returned
    if result != cu.CUresult.CUDA_SUCCESS:
        name, description = _error_name(result)
        cls = _ERROR_TYPES.get(name, DeviceError)
        detail = f" ({description})" if description else ""
        raise cls(f"{call} failed: {name}{detail}", call=call, error_name=name)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def format_uuid(raw: bytes | str) -> str:
    """A CUuuid's 16 bytes as nvidia-smi and NVML write them: ``GPU-`` and 8-4-4-4-12 hex digits.

    cuda-bindings gives `CUuuid.bytes` as a 16-byte ``bytes`` (13.x) or a 16-character ``str`` of
    byte values; both are accepted.
    """
    data = raw.encode("latin-1") if isinstance(raw, str) else bytes(raw)
    if len(data) != 16:
        raise DeviceError(f"cuDeviceGetUuid gave {len(data)} bytes, not 16")
    h = data.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def gpu_uuid(ordinal: int) -> str | None:
    """The UUID of this process's GPU `ordinal` (as CUDA_VISIBLE_DEVICES numbers it), or None when no
    driver loads or there is no such GPU. Makes no context: cheap enough to ask before connecting."""
    if cu is None:
        return None
    try:
        check("cuInit", cu.cuInit(0))
        if not 0 <= ordinal < check("cuDeviceGetCount", cu.cuDeviceGetCount()):
            return None
        return format_uuid(
            check("cuDeviceGetUuid", cu.cuDeviceGetUuid(check("cuDeviceGet", cu.cuDeviceGet(ordinal)))).bytes
        )
    except RuntimeError:  # DeviceError, or no libcuda.so.1 (cuda.pathfinder's DynamicLibNotFoundError)
        return None


class CudaDevice(Device):
    """GPU `ordinal`'s memory through the CUDA driver's VMM API.

    Raises:
        DeviceUnavailableError: No driver, no such GPU, or no VMM / POSIX-fd support.
    """

    kind = "cuda"

    def __init__(self, ordinal: int = 0):
        super().__init__()
        if cu is None:
            raise DeviceUnavailableError("cuda-bindings is not installed: pip install 'cuda-bindings>=12.8,<14'")
        try:
            check("cuInit", cu.cuInit(0))
        except RuntimeError as exc:  # DynamicLibNotFoundError, or a binding's missing symbol
            if isinstance(exc, DeviceError):
                raise DeviceUnavailableError(f"the CUDA driver does not initialize: {exc}") from exc
            raise DeviceUnavailableError(f"no CUDA driver (libcuda.so.1) could be loaded: {exc}") from exc
        count = check("cuDeviceGetCount", cu.cuDeviceGetCount())
        if not 0 <= ordinal < count:
            raise DeviceUnavailableError(f"GPU {ordinal} does not exist: the driver sees {count} GPU(s)")
        self.ordinal = ordinal
        self._dev = check("cuDeviceGet", cu.cuDeviceGet(ordinal))
        raw_name = check("cuDeviceGetName", cu.cuDeviceGetName(256, self._dev))
        self.name = raw_name.split(b"\0", 1)[0].decode(errors="replace")
        self.uuid = format_uuid(check("cuDeviceGetUuid", cu.cuDeviceGetUuid(self._dev)).bytes)
        attr = cu.CUdevice_attribute
        vmm = check(
            "cuDeviceGetAttribute",
            cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, self._dev),
        )
        posix_fd = check(
            "cuDeviceGetAttribute",
            cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, self._dev),
        )
        if not vmm or not posix_fd:
            missing = "virtual memory management" if not vmm else "POSIX file-descriptor handles"
            raise DeviceUnavailableError(f"GPU {ordinal} ({self.name}) does not support {missing}")

        self._ctx = check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(self._dev))
        self._ctx_int = int(self._ctx)
        try:
            self._make_current()
            self._prop = cu.CUmemAllocationProp()
            self._prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
            self._prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            self._prop.location.id = ordinal
            self._prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
            self.granularity = int(
                check(
                    "cuMemGetAllocationGranularity",
                    cu.cuMemGetAllocationGranularity(
                        self._prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                    ),
                )
            )
        except DeviceError:
            check("cuDevicePrimaryCtxRelease", cu.cuDevicePrimaryCtxRelease(self._dev))
            raise
        self._access_desc: dict[Access, Any] = {}
        for access in Access:
            desc = cu.CUmemAccessDesc()
            desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            desc.location.id = ordinal
            desc.flags = cu.CUmemAccess_flags(int(access))
            self._access_desc[access] = desc

    def _make_current(self) -> None:
        """Make the primary context current in the calling thread (cheap when it already is)."""
        current = check("cuCtxGetCurrent", cu.cuCtxGetCurrent())
        if int(current) != self._ctx_int:
            check("cuCtxSetCurrent", cu.cuCtxSetCurrent(self._ctx))

    # The lock of the base class is held in every _backend_* call but `_backend_create`, and the copies
    # of the batched copies (Device.copy_device_to_host_many): each makes the context current itself.

    def _backend_memory_info(self) -> MemoryInfo:
        self._make_current()
        free, total = check("cuMemGetInfo", cu.cuMemGetInfo())
        return MemoryInfo(free=int(free), total=int(total))

    def _backend_reserve(self, size: int, alignment: int) -> int:
        self._make_current()
        return int(check("cuMemAddressReserve", cu.cuMemAddressReserve(size, alignment, 0, 0)))

    def _backend_free(self, address: int, size: int) -> None:
        self._make_current()
        check("cuMemAddressFree", cu.cuMemAddressFree(address, size))

    def _backend_create(self, size: int) -> Any:
        self._make_current()
        return check("cuMemCreate", cu.cuMemCreate(size, self._prop, 0))

    def _backend_enter(self) -> None:
        self._make_current()  # once for a batch of imports: one cuCtxGetCurrent, not one per page

    def _backend_import(self, fd: int, size: int, consume: bool) -> Any:
        handle_type = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        handle = check("cuMemImportFromShareableHandle", cu.cuMemImportFromShareableHandle(fd, handle_type))
        if consume:
            # The driver keeps its own reference to the memory: the descriptor is not needed
            # once imported (CUDA driver API, cuMemImportFromShareableHandle).
            os.close(fd)
        return handle

    def _backend_export(self, handle: Any, size: int) -> int:
        self._make_current()
        handle_type = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        return int(check("cuMemExportToShareableHandle", cu.cuMemExportToShareableHandle(handle, handle_type, 0)))

    def _backend_release(self, handle: Any) -> None:
        self._make_current()
        check("cuMemRelease", cu.cuMemRelease(handle))

    def _backend_map(self, address: int, size: int, handle: Any) -> None:
        self._make_current()
        check("cuMemMap", cu.cuMemMap(address, size, 0, handle, 0))

    def _backend_unmap(self, address: int, size: int, handle: Any) -> None:
        # Synchronization is the caller's (see Mapping.close): cuMemUnmap does not wait for
        # kernels still reading the range.
        self._make_current()
        check("cuMemUnmap", cu.cuMemUnmap(address, size))

    def _backend_set_access(self, address: int, size: int, access: Access) -> None:
        self._make_current()
        check("cuMemSetAccess", cu.cuMemSetAccess(address, size, [self._access_desc[access]], 1))

    def _backend_memset(self, address: int, value: int, size: int) -> None:
        self._make_current()
        check("cuMemsetD8", cu.cuMemsetD8(address, value, size))

    def _backend_copy_dtod(self, dst: int, src: int, size: int) -> None:
        self._make_current()
        check("cuMemcpyDtoD", cu.cuMemcpyDtoD(dst, src, size))

    def _backend_copy_htod(self, dst: int, src_host: int, size: int) -> None:
        self._make_current()
        check("cuMemcpyHtoD", cu.cuMemcpyHtoD(dst, src_host, size))

    def _backend_copy_dtoh(self, dst_host: int, src: int, size: int) -> None:
        self._make_current()
        check("cuMemcpyDtoH", cu.cuMemcpyDtoH(dst_host, src, size))

    def _backend_host_alloc(self, size: int) -> int:
        # Page-locked, so cuMemcpyDtoH/HtoD run as direct DMA at full PCIe bandwidth (pageable
        # memory is staged through a driver buffer). Flags 0: portable to this context only.
        self._make_current()
        return int(check("cuMemHostAlloc", cu.cuMemHostAlloc(size, 0)))

    def _backend_host_free(self, address: int, size: int) -> None:
        self._make_current()
        check("cuMemFreeHost", cu.cuMemFreeHost(address))

    def _backend_synchronize(self) -> None:
        self._make_current()
        check("cuCtxSynchronize", cu.cuCtxSynchronize())

    def _backend_close(self) -> None:
        check("cuDevicePrimaryCtxRelease", cu.cuDevicePrimaryCtxRelease(self._dev))
