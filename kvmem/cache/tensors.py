"""Torch tensors over a cache's reservation: per-layer K and V views, and raw byte views.

Torch is imported on first use, not with this module.
"""

from __future__ import annotations

import ctypes
from typing import Any

from kvmem.common.layout import DTYPES, KVLayout
from kvmem.device import Device


def resolve_dtype(dtype: Any) -> Any:
    """The torch dtype for `dtype` (a torch dtype or its name without "torch.").

    Raises:
        ValueError: Not one of `kvmem.common.layout.DTYPES`.
    """
    import torch

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = getattr(torch, dtype)
    if str(dtype).removeprefix("torch.") not in DTYPES:
        raise ValueError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
    return dtype


class _CudaMemory:
    """A raw device range exposed through __cuda_array_interface__ (bytes, read/write)."""

    def __init__(self, address: int, size: int):
        self.__cuda_array_interface__ = {
            "shape": (size,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
        }


def bytes_tensor(device: Device, address: int, size: int) -> Any:
    """A flat uint8 tensor over `size` bytes at `address`; None on a CUDA device without CUDA torch
    (e.g. the fake driver), where no tensor can reach the memory."""
    import torch

    if device.kind == "host":
        return torch.frombuffer((ctypes.c_ubyte * size).from_address(address), dtype=torch.uint8)
    if torch.cuda.is_available():
        return torch.as_tensor(_CudaMemory(address, size), device=f"cuda:{device.ordinal}")
    return None


def layer_tensors(device: Device, base: int, layout: KVLayout, dtype: Any) -> tuple[list, list]:
    """Every layer's K and V tensor (shape `layout.shape`) over the reservation at `base`; lists of
    None where `bytes_tensor` gives none."""

    def view(offset: int) -> Any:
        raw = bytes_tensor(device, base + offset, layout.range_bytes)
        return None if raw is None else raw.view(dtype).view(layout.shape)

    return [view(offset) for offset in layout.k_offsets], [view(offset) for offset in layout.v_offsets]
