"""Compaction: move live blocks off the emptiest slots into the fullest, so that slots empty out."""

from __future__ import annotations

from kvmem.cache.growth import Growth
from kvmem.cache.state import CacheState


def compact(state: CacheState, growth: Growth, keys: list | None, values: list | None) -> dict[int, int]:
    """Move live blocks off the emptiest slots into free blocks of the fullest, then give the
    emptied slots back; return ``{old block id: new block id}`` for every block moved.

    The blocks move in every layer's K and V with one `kvmem.kernels.move_blocks` launch when the
    cache has torch tensors (`keys`, `values`: every layer's), else with one device copy per block
    and range (a CUDA device without CUDA torch, e.g. the fake driver). Contract: no work may use
    the cache during the call (the device is synchronized before and after the copies), and the
    engine must rewrite its block tables with the returned mapping before using a moved block: the
    old ids are free afterwards.
    """
    slots = state.slots
    layout = slots.layout
    allocator = state.allocator
    with state.grow_lock:  # no slot is mapped or unmapped meanwhile; the contract keeps allocs away
        usage = allocator.get_slot_usage()
        used = sum(count for _, count in usage)
        keep = {slot for slot, _ in usage[: -(-used // layout.blocks_per_slot)]}
        movers = [b for slot, count in usage if slot not in keep and count for b in allocator.get_used_blocks(slot)]
        if not movers:
            return {}
        # The kept slots are the fullest in alloc's own order and have room for every mover,
        # so alloc hands out their free blocks only.
        targets = allocator.alloc(len(movers))
        if any(block // layout.blocks_per_slot not in keep for block in targets):
            allocator.free(targets)
            raise RuntimeError("compaction found no room in the fullest slots (allocator order changed?)")
        device = state.source.device
        device.synchronize()  # kernels still running may write the blocks being moved
        if keys is not None and values is not None and keys[0] is not None:
            import torch

            from kvmem.kernels import move_blocks

            on = keys[0].device
            move_blocks(keys, values, torch.tensor(movers, device=on), torch.tensor(targets, device=on))
        else:
            base = slots.reservation.address
            for r in range(layout.num_ranges):
                for src, dst in zip(movers, targets, strict=True):
                    device.copy_device_to_device(
                        base + layout.block_offset(r, dst), base + layout.block_offset(r, src), layout.block_bytes
                    )
        device.synchronize()
        allocator.free(movers)
    growth.shrink()
    return dict(zip(movers, targets, strict=True))
