"""The KV layout descriptor: everything another process or tool needs to interpret a kvmem page.

Design note
-----------
An `ElasticKVCache` cuts one virtual reservation into ``2 * num_layers`` equal ranges (K0, V0,
K1, V1, ...), each one layer's K or V tensor; pages are mapped slot by slot at the same offset of
every range (see `kvmem.cache`). `KVLayout` writes that down as plain numbers: geometry, dtype,
axis order, the element strides of each layer tensor, the page and slot sizes, and the byte offset
of every layer's K and V range within the reservation. It travels as JSON (`to_dict` /
`from_dict`), so it imports neither torch nor anything else that a daemon or a tool might lack.

The derived fields (block_bytes, pages_per_slot, slot_bytes, blocks_per_slot, range_bytes, shape,
strides, offsets) are stored, not only computed, so that a reader in any language finds them
without knowing kvmem's rules; construction checks every one of them against those rules, and a
descriptor that disagrees is refused with a one-line ValueError naming the field. A change of the
rules is a new `version`. `docs/layout.md` is the reference for the format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

VERSION = 1

# Element size in bytes of each dtype a kvmem cache can hold (torch's names, without "torch.").
DTYPE_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1}
DTYPES = tuple(DTYPE_SIZES)
LAYOUTS = ("NHD", "HND")
# The most layers a descriptor may name. The largest open models have a few hundred; the bound
# keeps a hostile descriptor from making its reader build huge offset lists.
MAX_LAYERS = 4096


@dataclass(frozen=True)
class KVLayout:
    """How the bytes of one elastic KV cache's reservation are laid out.

    Block ``b`` of layer ``l``'s K starts at byte ``k_offsets[l] + b * block_bytes`` of the
    reservation (V: ``v_offsets[l]``). Inside a block, element ``(t, h, d)`` (token, head, dim)
    is at element offset ``t * strides[1] + h * strides[2] + d`` for "NHD" and
    ``h * strides[1] + t * strides[2] + d`` for "HND". Page ``p`` of slot ``s`` of range ``r``
    (ranges ordered K0, V0, K1, V1, ...) is mapped at byte
    ``r * range_bytes + s * slot_bytes + p * page_size``.

    Attributes:
        version: Format version; this module reads and writes `VERSION` only.
        num_layers: Layers; the reservation holds ``2 * num_layers`` ranges.
        block_size: Tokens per block.
        num_kv_heads: KV heads.
        head_dim: Elements per head and token.
        dtype: Element type, one of `DTYPES` (torch's name, e.g. ``"float16"``).
        itemsize: Bytes per element (``DTYPE_SIZES[dtype]``).
        layout: ``"NHD"`` (``[blocks, block_size, heads, head_dim]``) or ``"HND"``
            (``[blocks, heads, block_size, head_dim]``).
        max_blocks: Blocks in each layer tensor (a whole number of slots).
        shape: Shape of each layer tensor, in the order `layout` names.
        strides: Element strides of each layer tensor (contiguous: ``strides[0]`` is one block).
        block_bytes: Bytes of one block of one layer's K or V.
        page_size: Bytes of one physical page (the device's allocation granularity).
        pages_per_slot: Pages mapped together at one slot of each range (``lcm(page_size,
            block_bytes) / page_size``).
        slot_bytes: ``pages_per_slot * page_size``.
        blocks_per_slot: ``slot_bytes / block_bytes``.
        range_bytes: Bytes of one range (``max_blocks / blocks_per_slot * slot_bytes``).
        k_offsets: Byte offset of each layer's K range in the reservation (``2 * l * range_bytes``).
        v_offsets: Byte offset of each layer's V range (``(2 * l + 1) * range_bytes``).
    """

    version: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    itemsize: int
    layout: str
    max_blocks: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    block_bytes: int
    page_size: int
    pages_per_slot: int
    slot_bytes: int
    blocks_per_slot: int
    range_bytes: int
    k_offsets: tuple[int, ...]
    v_offsets: tuple[int, ...]

    @classmethod
    def derive(
        cls,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: str,
        layout: str,
        page_size: int,
        max_blocks: int,
    ) -> KVLayout:
        """The descriptor of a cache with this geometry, computing every derived field.

        Raises:
            ValueError: A bad argument, naming it; `max_blocks` must be a whole number of slots
                (a cache rounds its capacity up to one).
        """
        return cls(
            **_derived_fields(num_layers, block_size, num_kv_heads, head_dim, dtype, layout, page_size, max_blocks)
        )

    @classmethod
    def for_tokens(
        cls,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: str,
        layout: str,
        page_size: int,
        max_tokens: int | None = None,
        memory_bytes: int = 0,
    ) -> KVLayout:
        """The descriptor of the smallest cache that holds `max_tokens` tokens in whole slots.

        Args:
            max_tokens: Tokens the cache must hold; None: as many as `memory_bytes` could hold
                (every layer's K and V of a token counted).

        Raises:
            ValueError: A bad argument, naming it, or a capacity of less than one token.
        """
        for name, value in (
            ("num_layers", num_layers),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("page_size", page_size),
        ):
            _check_int(name, value)
        if dtype not in DTYPE_SIZES:
            raise ValueError(f"layout descriptor: dtype {_short(dtype)} is not one of {', '.join(DTYPES)}")
        block_bytes = block_size * num_kv_heads * head_dim * DTYPE_SIZES[dtype]
        if max_tokens is None:
            max_tokens = memory_bytes // (2 * num_layers * block_bytes) * block_size
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens}: the cache must hold at least one token")
        blocks_per_slot = _slot_sizes(block_bytes, page_size)[2]
        max_blocks = -(-max_tokens // block_size)
        max_slots = -(-max_blocks // blocks_per_slot)
        return cls.derive(
            num_layers, block_size, num_kv_heads, head_dim, dtype, layout, page_size, max_slots * blocks_per_slot
        )

    @property
    def max_slots(self) -> int:
        """Slots in each range: ``max_blocks / blocks_per_slot``."""
        return self.max_blocks // self.blocks_per_slot

    @property
    def num_ranges(self) -> int:
        """K and V ranges in the reservation: ``2 * num_layers``."""
        return 2 * self.num_layers

    def page_offset(self, range_index: int, slot: int, page: int) -> int:
        """Byte offset in the reservation of page `page` of slot `slot` of range `range_index`."""
        return range_index * self.range_bytes + slot * self.slot_bytes + page * self.page_size

    def block_offset(self, range_index: int, block: int) -> int:
        """Byte offset in the reservation of block `block` of range `range_index` (K of layer l: 2l, V: 2l+1)."""
        return range_index * self.range_bytes + block * self.block_bytes

    def locate(self, offset: int) -> tuple[int, int, int]:
        """``(range_index, slot, page)`` of the page mapped at byte `offset` (`page_offset`'s inverse)."""
        range_index, within = divmod(offset, self.range_bytes)
        slot, page_bytes = divmod(within, self.slot_bytes)
        return range_index, slot, page_bytes // self.page_size

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("dtype", "layout"):
                if type(value) is not str:
                    raise ValueError(f"layout descriptor: {f.name} must be a string, not {type(value).__name__}")
            elif f.name in ("shape", "strides", "k_offsets", "v_offsets"):
                if type(value) is not tuple or any(type(x) is not int or x < 0 for x in value):
                    raise ValueError(f"layout descriptor: {f.name} must be a list of non-negative integers")
            else:
                _check_int(f.name, value)
        if self.version != VERSION:
            raise ValueError(f"layout descriptor: version {self.version} is not supported (this kvmem reads {VERSION})")
        # What the descriptor carries must be as long as what it claims, before anything is derived
        # from the claim: checking a descriptor costs what it is, not what it says (a 600-byte frame
        # claiming 10^9 layers must not make the daemon build 10^9 offsets).
        for name in ("k_offsets", "v_offsets"):
            if len(getattr(self, name)) != self.num_layers:
                raise ValueError(
                    f"layout descriptor: {name} has {len(getattr(self, name))} entries for {self.num_layers} layers"
                )
        expected = _derived_fields(
            self.num_layers,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.layout,
            self.page_size,
            self.max_blocks,
        )
        for name, value in expected.items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"layout descriptor: {name}={_short(getattr(self, name))} does not match the geometry "
                    f"(expected {_short(value)})"
                )

    @property
    def reservation_bytes(self) -> int:
        """Bytes of the whole reservation: ``2 * num_layers * range_bytes``."""
        return 2 * self.num_layers * self.range_bytes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: every field by name, tuples as lists."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any) -> KVLayout:
        """The descriptor `to_dict` wrote, checked field by field.

        Raises:
            ValueError: Not a dict, a missing or unknown field, a value of the wrong type, or a
                derived field that does not match the geometry; the message names the field.
        """
        if not isinstance(data, dict):
            raise ValueError(f"layout descriptor: expected a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        for name in names:
            if name not in data:
                raise ValueError(f"layout descriptor: missing field {name!r}")
        for key in data:
            if key not in names:
                raise ValueError(f"layout descriptor: unknown field {str(key)[:40]!r}")
        values = {}
        for name in names:
            value = data[name]
            if isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return cls(**values)


def _derived_fields(
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: str,
    layout: str,
    page_size: int,
    max_blocks: int,
) -> dict[str, Any]:
    """Every field of the descriptor of this geometry, by kvmem's layout rules."""
    for name, value in (
        ("num_layers", num_layers),
        ("block_size", block_size),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("page_size", page_size),
        ("max_blocks", max_blocks),
    ):
        _check_int(name, value)
    if num_layers > MAX_LAYERS:
        raise ValueError(f"layout descriptor: num_layers={num_layers} is more than {MAX_LAYERS}")
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"layout descriptor: dtype {_short(dtype)} is not one of {', '.join(DTYPES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout descriptor: layout {_short(layout)} is not one of {', '.join(LAYOUTS)}")
    itemsize = DTYPE_SIZES[dtype]
    block_bytes = block_size * num_kv_heads * head_dim * itemsize
    pages_per_slot, slot_bytes, blocks_per_slot = _slot_sizes(block_bytes, page_size)
    if max_blocks % blocks_per_slot:
        raise ValueError(
            f"layout descriptor: max_blocks={max_blocks} is not a whole number of slots of {blocks_per_slot} blocks"
        )
    range_bytes = max_blocks // blocks_per_slot * slot_bytes
    middle = (block_size, num_kv_heads) if layout == "NHD" else (num_kv_heads, block_size)
    shape = (max_blocks, *middle, head_dim)
    return {
        "version": VERSION,
        "num_layers": num_layers,
        "block_size": block_size,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "dtype": dtype,
        "itemsize": itemsize,
        "layout": layout,
        "max_blocks": max_blocks,
        "shape": shape,
        "strides": _contiguous_strides(shape),
        "block_bytes": block_bytes,
        "page_size": page_size,
        "pages_per_slot": pages_per_slot,
        "slot_bytes": slot_bytes,
        "blocks_per_slot": blocks_per_slot,
        "range_bytes": range_bytes,
        "k_offsets": tuple(2 * layer * range_bytes for layer in range(num_layers)),
        "v_offsets": tuple((2 * layer + 1) * range_bytes for layer in range(num_layers)),
    }


def _slot_sizes(block_bytes: int, page_size: int) -> tuple[int, int, int]:
    """``(pages_per_slot, slot_bytes, blocks_per_slot)``: a slot is the least whole number of pages
    that holds a whole number of blocks."""
    pages_per_slot = math.lcm(page_size, block_bytes) // page_size
    slot_bytes = pages_per_slot * page_size
    return pages_per_slot, slot_bytes, slot_bytes // block_bytes


def _check_int(name: str, value: Any) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"layout descriptor: {name}={_short(value)} must be a positive integer")


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _short(value: Any) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 60 else text[:57] + "..."
