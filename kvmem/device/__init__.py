"""kvmem's device layer: elastic memory from virtual reservations and physical pages.

Use `open_device()`; see `kvmem.device.base` for the design and the resource objects.
"""

from __future__ import annotations

import logging

from kvmem.device.base import (
    Access,
    Device,
    ExportedHandle,
    HostBuffer,
    Mapping,
    MemoryInfo,
    PhysicalPage,
    Reservation,
)
from kvmem.device.errors import (
    AlreadyMappedError,
    ClosedError,
    DeviceError,
    DeviceUnavailableError,
    IllegalAddressError,
    InvalidArgumentError,
    OutOfMemoryError,
)
from kvmem.device.host import HostDevice

__all__ = [
    "DEVICE_KINDS",
    "Access",
    "AlreadyMappedError",
    "ClosedError",
    "CudaDevice",
    "Device",
    "DeviceError",
    "DeviceUnavailableError",
    "ExportedHandle",
    "HostBuffer",
    "HostDevice",
    "IllegalAddressError",
    "InvalidArgumentError",
    "Mapping",
    "MemoryInfo",
    "OutOfMemoryError",
    "PhysicalPage",
    "Reservation",
    "open_device",
]

DEVICE_KINDS = ("auto", "cuda", "host")

logger = logging.getLogger(__name__)


def __getattr__(name: str) -> type[Device]:
    # CudaDevice is imported on first use: its module loads cuda-bindings, which a host-only
    # process (tests, the host daemon, CPU engines) never needs.
    if name == "CudaDevice":
        from kvmem.device.cuda import CudaDevice

        return CudaDevice
    raise AttributeError(f"module 'kvmem.device' has no attribute {name!r}")


def open_device(kind: str = "auto", ordinal: int = 0, *, host_capacity: int | None = None) -> Device:
    """Open a device.

    Args:
        kind: ``"cuda"`` (GPU `ordinal`, or DeviceUnavailableError), ``"host"`` (host RAM), or
            ``"auto"``: CUDA when ``libcuda.so.1`` loads and the GPU supports VMM, else host.
        ordinal: GPU index for CUDA.
        host_capacity: Bytes of host memory a HostDevice may hand out (default: all RAM).

    Raises:
        DeviceUnavailableError: `kind` is ``"cuda"`` and no usable GPU is there.
        InvalidArgumentError: `kind` is not one of DEVICE_KINDS.
    """
    if kind not in DEVICE_KINDS:
        raise InvalidArgumentError(f"device kind {kind!r} is not one of {', '.join(DEVICE_KINDS)}")
    if kind in ("auto", "cuda"):
        from kvmem.device.cuda import CudaDevice

        try:
            return CudaDevice(ordinal)
        except DeviceUnavailableError as exc:
            if kind == "cuda":
                raise
            logger.info("using host memory: %s", exc)
    return HostDevice(capacity=host_capacity)
