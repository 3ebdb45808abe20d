"""kvmem.device._host_copy: the streaming copy the host device's page copies use (C)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kvmem.device import _host_copy


@pytest.mark.parametrize(
    ("dst_offset", "src_offset", "size"),
    [(0, 0, 2 << 20), (1, 0, 70_001), (7, 3, 4096), (0, 5, 4095), (13, 13, 64), (3, 0, 1), (9, 9, 0)],
)
def test_the_copy_writes_exactly_the_range_whatever_the_alignment(dst_offset: int, src_offset: int, size: int):
    source = np.random.default_rng(size).integers(0, 256, size + 64, dtype=np.uint8)
    target = np.full(size + 64, 0xAB, dtype=np.uint8)
    _host_copy.stream(target.ctypes.data + dst_offset, source.ctypes.data + src_offset, size)
    assert np.array_equal(target[dst_offset : dst_offset + size], source[src_offset : src_offset + size])
    untouched = np.concatenate([target[:dst_offset], target[dst_offset + size :]])
    assert (untouched == 0xAB).all()  # not a byte before or after the range


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((1, 1, -1), ValueError, "size -1 is negative"),
        ((0, 4096, 8), ValueError, "dst address 0 is not a valid pointer"),
        ((4096, 0, 8), ValueError, "src address 0 is not a valid pointer"),
        ((-5, 4096, 8), OverflowError, "negative"),
        ((1, 2), TypeError, "takes 3 arguments, not 2"),
        (("a", 1, 1), TypeError, "integer"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_copied(args: tuple, error: type, message: str):
    with pytest.raises(error, match=message):
        _host_copy.stream(*args)


def test_the_copy_reads_what_ctypes_buffers_hold():
    src = ctypes.create_string_buffer(bytes(range(256)) * 40, 10_240)
    dst = ctypes.create_string_buffer(10_240)
    _host_copy.stream(ctypes.addressof(dst), ctypes.addressof(src), 10_240)
    assert dst.raw == src.raw
