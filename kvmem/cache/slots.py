"""Page slots of one reservation: mapping and unmapping a slot's pages in every K and V range.

A slot is `KVLayout.pages_per_slot` pages at the same place of each of the ``2 * num_layers``
ranges (K0, V0, K1, V1, ...), so that its blocks become usable in every layer at once. Every
offset here comes from the `KVLayout`: this module does no layout arithmetic of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kvmem.common.layout import KVLayout
from kvmem.common.undo import Undo
from kvmem.device import Access, Device, Mapping
from kvmem.page_source import Page


@dataclass
class MappedSlot:
    """A mapped slot: its pages in range order (range 0's pages, then range 1's, ...), and
    ``mappings[i]``, the mapping of ``pages[i]``."""

    pages: list[Page]
    mappings: list[Mapping]


class SlotMap:
    """The reservation of one cache and which of its slots are mapped, with what.

    Not thread-safe: the cache calls it with its grow lock held (one mapper or unmapper at a time).

    Attributes:
        layout: The cache's layout; the reservation is `layout.reservation_bytes` long.
        reservation: The virtual range every K and V tensor lies in.
        pages_per_growth: Pages one slot takes, over every range.
        mapped: Slot number -> what is mapped there.
    """

    def __init__(self, device: Device, layout: KVLayout):
        self.device = device
        self.layout = layout
        self.pages_per_growth = layout.num_ranges * layout.pages_per_slot
        self.reservation = device.reserve(layout.reservation_bytes)
        self.mapped: dict[int, MappedSlot] = {}

    def page_offsets(self, slot: int) -> list[int]:
        """Where each page of `slot` is mapped, in the order of `MappedSlot.pages`."""
        per = self.layout.pages_per_slot
        return [self.layout.page_offset(r, slot, j) for r in range(self.layout.num_ranges) for j in range(per)]

    def page_index(self, offset: int) -> tuple[int, int]:
        """``(slot, index in MappedSlot.pages)`` of the page mapped at byte `offset`."""
        range_index, slot, page = self.layout.locate(offset)
        return slot, range_index * self.layout.pages_per_slot + page

    def map(self, slots: list[int], pages: list[Page]) -> None:
        """Map `pages` at `slots` (`pages_per_growth` pages each, in order) and allow access with one
        call per contiguous run of slots in each range. All or nothing: on an error every mapping
        made here is undone and the pages stay the caller's."""
        per = self.pages_per_growth
        if len(pages) != len(slots) * per:
            raise ValueError(f"{len(pages)} pages for {len(slots)} slots of {per} pages")
        made: dict[int, MappedSlot] = {}
        with Undo() as undo:
            for i, slot in enumerate(slots):
                entry = MappedSlot(pages[i * per : (i + 1) * per], [])
                for page, offset in zip(entry.pages, self.page_offsets(slot), strict=True):
                    mapping = self.device.map(self.reservation, offset, page.physical)
                    undo.push(mapping.close)  # never accessible yet: no device work can touch it
                    entry.mappings.append(mapping)
                made[slot] = entry
            self.allow_access(slots)
        self.mapped.update(made)

    def map_page(self, offset: int, page: Page) -> Mapping:
        """Map one page at `offset`, without access (a wake maps restored pages one by one)."""
        return self.device.map(self.reservation, offset, page.physical)

    def allow_access(self, slots: list[int]) -> None:
        """Read/write access to `slots` (all mapped) in every range: one call per contiguous run."""
        layout = self.layout
        for start, count in runs(slots):
            for r in range(layout.num_ranges):
                offset = layout.page_offset(r, start, 0)
                self.device.set_access(self.reservation, offset, count * layout.slot_bytes, Access.READ_WRITE)

    def unmap(self, slots: list[int]) -> list[MappedSlot]:
        """Unmap `slots` and forget them; return what was mapped there (pages for the caller to give back).

        The device is synchronized first: kernels issued on these slots' blocks may still be running,
        and cuMemUnmap does not wait for them. The caller must have made sure that no new work can
        reach the slots (their blocks are out of the allocator, and the engine agreed).
        """
        if not slots:
            return []
        self.device.synchronize()
        return [self._unmap_slot(slot) for slot in slots]

    def unmap_in_batches(self, slots: list[int], pages_per_batch: int) -> Iterator[list[tuple[int, MappedSlot]]]:
        """Unmap `slots` a few at a time (whole slots, about `pages_per_batch` pages), yielding each
        batch of ``(slot, what was mapped there)`` as soon as it is unmapped, so that the caller
        hands its pages on (a sleep's copies begin) while the next batch is unmapped.

        One synchronize before the first unmap covers every batch: the caller has made sure that
        no new work can reach these slots (see `unmap`), so nothing issued after it touches them.
        """
        if not slots:
            return
        self.device.synchronize()
        per_batch = max(1, pages_per_batch // self.pages_per_growth)
        for start in range(0, len(slots), per_batch):
            yield [(slot, self._unmap_slot(slot)) for slot in slots[start : start + per_batch]]

    def _unmap_slot(self, slot: int) -> MappedSlot:
        entry = self.mapped.pop(slot)
        for mapping in entry.mappings:
            mapping.close()
        return entry

    def close(self) -> None:
        """Free the reservation; every slot must be unmapped."""
        self.reservation.close()


def runs(slots: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of slot numbers as ``(start, length)``."""
    found: list[tuple[int, int]] = []
    for slot in sorted(slots):
        if found and found[-1][0] + found[-1][1] == slot:
            found[-1] = (found[-1][0], found[-1][1] + 1)
        else:
            found.append((slot, 1))
    return found
