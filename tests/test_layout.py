"""The KV layout descriptor: derived fields, the strict dict round trip, and that it describes a
real cache's reservation well enough to find any element's bytes (host and fake CUDA devices)."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest
import torch

import kvmem
from kvmem.common.layout import DTYPES, VERSION, KVLayout

MiB = 1 << 20
PAGE = 2 * MiB


def llama_like(**changes) -> KVLayout:
    args = {
        "num_layers": 2,
        "block_size": 16,
        "num_kv_heads": 2,
        "head_dim": 64,
        "dtype": "float16",
        "layout": "NHD",
        "page_size": PAGE,
        "max_blocks": 1024,
    }
    args.update(changes)
    return KVLayout.derive(**args)


def test_derived_fields_of_a_block_that_divides_the_page():
    d = llama_like()
    assert (d.version, d.itemsize, d.block_bytes) == (VERSION, 2, 16 * 2 * 64 * 2)
    assert (d.pages_per_slot, d.slot_bytes, d.blocks_per_slot) == (1, PAGE, 512)
    assert d.range_bytes == 2 * PAGE and d.reservation_bytes == 4 * 2 * PAGE
    assert d.shape == (1024, 16, 2, 64) and d.strides == (2048, 128, 64, 1)
    assert d.k_offsets == (0, 4 * PAGE) and d.v_offsets == (2 * PAGE, 6 * PAGE)


def test_for_tokens_rounds_the_capacity_up_to_whole_slots():
    geometry = {"num_layers": 2, "block_size": 16, "num_kv_heads": 1, "head_dim": 80, "dtype": "bfloat16"}
    # 2,560-byte blocks: 4,096 blocks per slot of 5 pages.
    assert KVLayout.for_tokens(**geometry, layout="NHD", page_size=PAGE, max_tokens=1).max_blocks == 4096
    assert KVLayout.for_tokens(**geometry, layout="NHD", page_size=PAGE, max_tokens=16 * 4097).max_blocks == 8192
    # No max_tokens: what the memory holds, every layer's K and V of a token counted (4 ranges of 160 bytes).
    d = KVLayout.for_tokens(**geometry, layout="HND", page_size=PAGE, memory_bytes=640 * 16 * 4096 * 3)
    assert (d.max_blocks, d.max_slots, d.num_ranges) == (3 * 4096, 3, 4)
    with pytest.raises(ValueError, match="max_tokens=0: the cache must hold at least one token"):
        KVLayout.for_tokens(**geometry, layout="NHD", page_size=PAGE, memory_bytes=639)


def test_offsets_of_pages_and_blocks_and_back():
    d = llama_like(layout="HND", num_kv_heads=1, head_dim=80, max_blocks=3 * 4096, dtype="bfloat16")
    # Range 3 (V of layer 1), slot 2, page 4 of the slot's 5.
    offset = d.page_offset(3, 2, 4)
    assert offset == 3 * d.range_bytes + 2 * 5 * PAGE + 4 * PAGE
    assert d.locate(offset) == (3, 2, 4) and d.locate(offset + PAGE - 1) == (3, 2, 4)
    assert d.block_offset(3, 4097) == d.v_offsets[1] + 4097 * 2560


def test_derived_fields_of_hnd_and_of_a_block_that_does_not_divide_the_page():
    d = llama_like(layout="HND", num_kv_heads=1, head_dim=80, max_blocks=4096, dtype="bfloat16")
    # 2,560-byte blocks: lcm with 2 MiB pages is 5 pages holding 4,096 blocks.
    assert (d.block_bytes, d.pages_per_slot, d.slot_bytes, d.blocks_per_slot) == (2560, 5, 5 * PAGE, 4096)
    assert d.shape == (4096, 1, 16, 80) and d.strides == (1280, 1280, 80, 1)
    assert d.range_bytes == 5 * PAGE and d.k_offsets == (0, 10 * PAGE) and d.v_offsets == (5 * PAGE, 15 * PAGE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dict_round_trip_through_json(dtype: str):
    d = llama_like(dtype=dtype, layout="HND", num_layers=3, max_blocks=2048 // llama_like(dtype=dtype).itemsize)
    data = json.loads(json.dumps(d.to_dict()))
    assert data["k_offsets"] == list(d.k_offsets) and data["dtype"] == dtype
    assert KVLayout.from_dict(data) == d
    assert [f.name for f in fields(KVLayout)] == list(data)


def bad(data: dict, **changes) -> dict:
    out = dict(data)
    out.update(changes)
    return out


GOOD = llama_like().to_dict()
MISSING = {k: v for k, v in GOOD.items() if k != "slot_bytes"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "expected a JSON object, got list"),
        (MISSING, "missing field 'slot_bytes'"),
        (bad(GOOD, extra=1), "unknown field 'extra'"),
        (bad(GOOD, version=2), "version 2 is not supported"),
        (bad(GOOD, num_layers=True), "num_layers=True must be a positive integer"),
        (bad(GOOD, head_dim="64"), "head_dim='64' must be a positive integer"),
        (bad(GOOD, block_size=0), "block_size=0 must be a positive integer"),
        (bad(GOOD, dtype=3), "dtype must be a string"),
        (bad(GOOD, dtype="float64"), "dtype 'float64' is not one of"),
        (bad(GOOD, layout="NDH"), "layout 'NDH' is not one of"),
        (bad(GOOD, strides=[2048, 128, 64, "1"]), "strides must be a list of non-negative integers"),
        (bad(GOOD, k_offsets=7), "k_offsets must be a list of non-negative integers"),
        (bad(GOOD, max_blocks=1000), "max_blocks=1000 is not a whole number of slots of 512 blocks"),
        (bad(GOOD, itemsize=4), "itemsize=4 does not match the geometry (expected 2)"),
        (bad(GOOD, block_bytes=4097), "block_bytes=4097 does not match the geometry (expected 4096)"),
        (bad(GOOD, pages_per_slot=2), "pages_per_slot=2 does not match"),
        (bad(GOOD, slot_bytes=PAGE + 1), "slot_bytes=2097153 does not match"),
        (bad(GOOD, blocks_per_slot=511), "blocks_per_slot=511 does not match"),
        (bad(GOOD, range_bytes=PAGE), "range_bytes=2097152 does not match"),
        (bad(GOOD, shape=[1024, 2, 16, 64]), "shape=[1024, 2, 16, 64] does not match"),
        (bad(GOOD, strides=[2048, 128, 1, 64]), "strides=[2048, 128, 1, 64] does not match"),
        (bad(GOOD, k_offsets=[0, 4 * PAGE, 8 * PAGE]), "k_offsets has 3 entries for 2 layers"),
        (bad(GOOD, k_offsets=[0, 8 * PAGE]), "k_offsets=[0, 16777216] does not match"),
        (bad(GOOD, v_offsets=[PAGE, 6 * PAGE]), "v_offsets=[2097152, 12582912] does not match"),
        (bad(GOOD, num_layers=3), "k_offsets has 2 entries for 3 layers"),
        (bad(GOOD, num_layers=10**9), "k_offsets has 2 entries for 1000000000 layers"),
        (
            bad(GOOD, num_layers=5000, k_offsets=[0] * 5000, v_offsets=[0] * 5000),
            "num_layers=5000 is more than 4096",
        ),
    ],
)
def test_from_dict_refuses_bad_input_with_one_line_naming_the_field(data, message: str):
    with pytest.raises(ValueError) as info:
        KVLayout.from_dict(data)
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith("layout descriptor: ")


def test_the_dataclass_is_frozen_and_checks_direct_construction():
    d = llama_like()
    with pytest.raises(AttributeError):
        d.block_bytes = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="range_bytes=1 does not match"):
        replace(d, range_bytes=1)


@pytest.mark.parametrize("device", ["host", "cuda"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_a_cache_descriptor_locates_every_byte_of_its_reservation(device: str, layout: str):
    """Bytes written at the address the descriptor gives for (layer, K/V, block, token, head, dim)
    read back through the cache at that element, and nowhere else."""
    with kvmem.local(device=device, budget="64MiB") as session:
        cache = session.kv_cache(
            num_layers=2, block_size=16, num_kv_heads=2, head_dim=80, max_tokens=100, layout=layout, background=False
        )
        d = cache.layout_descriptor
        assert d == KVLayout.from_dict(json.loads(json.dumps(d.to_dict())))
        assert (d.block_bytes, d.pages_per_slot, d.slot_bytes, d.blocks_per_slot, d.range_bytes) == (
            cache.block_bytes,
            cache.pages_per_slot,
            cache.slot_bytes,
            cache.blocks_per_slot,
            cache.range_bytes,
        )
        assert (d.max_blocks, d.page_size, d.layout, d.dtype) == (cache.max_blocks, cache.page_size, layout, "float16")
        for layer in range(2):
            assert cache.reservation.address + d.k_offsets[layer] == cache.range_address(layer, "k")
            assert cache.reservation.address + d.v_offsets[layer] == cache.range_address(layer, "v")
        if device == "host":
            assert tuple(cache.k[0].shape) == d.shape and cache.k[1].stride() == d.strides
        ids = cache.alloc(5)
        block, token, head, dim = ids[3], 9, 1, 77
        inner = (token, head) if layout == "NHD" else (head, token)
        element = inner[0] * d.strides[1] + inner[1] * d.strides[2] + dim
        address = cache.reservation.address + d.v_offsets[1] + block * d.block_bytes + element * d.itemsize
        cache.device.copy_host_to_device(address, torch.tensor([1.5], dtype=torch.float16).view(torch.uint8).numpy())
        raw = cache.device.read(cache.range_address(1, "v"), (block + 1) * d.block_bytes)
        values = torch.frombuffer(bytearray(raw), dtype=torch.float16).view(block + 1, *d.shape[1:])
        assert float(values[(block, *inner, dim)]) == 1.5
        assert int((values != 0).sum()) == 1  # the pages were zero: nothing else was written
        cache.free(ids)
