"""Exceptions of the device layer.

Every failure of a device call is a `DeviceError`. Out-of-memory is an expected outcome for an
elastic allocator, so it has its own type that callers catch on purpose; everything else means a
bug or a broken device. Exceptions raised from a CUDA result carry the driver call and the error
name, e.g. ``cuMemMap failed: CUDA_ERROR_ALREADY_MAPPED (resource already mapped)``.
"""

from __future__ import annotations


class DeviceError(RuntimeError):
    """A device operation failed.

    Attributes:
        call: The driver call that failed (e.g. ``"cuMemCreate"``), or None when the error was
            found before any driver call.
        error_name: The driver's name for the error (e.g. ``"CUDA_ERROR_INVALID_VALUE"``), or None.
    """

    def __init__(self, message: str, *, call: str | None = None, error_name: str | None = None):
        super().__init__(message)
        self.call = call
        self.error_name = error_name


class DeviceUnavailableError(DeviceError):
    """The requested device cannot be used here (no driver, no such GPU, no VMM support)."""


class InvalidArgumentError(DeviceError, ValueError):
    """An argument was refused: misaligned size or address, range outside a reservation, etc."""


class OutOfMemoryError(DeviceError):
    """The device has no memory left for this allocation. The device stays usable."""


class AlreadyMappedError(DeviceError):
    """The address range already has memory mapped into it."""


class IllegalAddressError(DeviceError):
    """A memset or copy touched a device range that is not mapped, or lacks the access it needs."""


class ClosedError(DeviceError):
    """The resource or device was already closed."""
