"""The daemon's host tier in this process, on the host device: pipelined batches, and a failing batch.

The daemon-level tests (tests/test_sleep.py) break a copy through the fake driver; the host device
has no such switch, so here a batch fails for real: one of its pages is not mapped any more when
its job runs (the device refuses the whole batch before copying anything).
"""

from __future__ import annotations

import os
import threading

from kvmem.device import Device, HostDevice, IllegalAddressError
from kvmemd.host_tier import BATCH_PAGES, HostTier
from tests.daemon_support import wait_for
from tests.support import HOST_CAPACITY

PAGES = 3 * BATCH_PAGES


class Completions:
    """Runs the tier's completions in this thread (the daemon's loop does it after `notify`)."""

    def __init__(self) -> None:
        self.ready = threading.Event()

    def wait_for(self, tier: HostTier, predicate) -> None:
        while not predicate():
            assert self.ready.wait(timeout=30), "a copy job never finished"
            self.ready.clear()
            tier.run_completions()


def pages_in(device: Device, n: int):
    g = device.granularity
    reservation = device.reserve(n * g)
    pages = [device.create_page() for _ in range(n)]
    mappings = [device.map(reservation, i * g, page) for i, page in enumerate(pages)]
    device.set_access(reservation, 0, n * g)
    return reservation, mappings  # the device closes the pages at the end


def test_batches_saved_and_restored_exactly_and_a_failing_batch_keeps_nothing():
    device = HostDevice(capacity=HOST_CAPACITY)
    g = device.granularity
    completions = Completions()
    tier = HostTier(device, g, capacity=PAGES * g, notify=completions.ready.set)
    reservation, mappings = pages_in(device, PAGES)
    data = [os.urandom(g) for _ in range(PAGES)]
    for i, payload in enumerate(data):
        device.copy_host_to_device(reservation.address + i * g, payload)
    addresses = [reservation.address + i * g for i in range(PAGES)]
    offsets = [1000 * g + i * g for i in range(PAGES)]  # where "the engine" had each page

    # Batch 1 fails: its last page is unmapped before the job can run (the device refuses the batch).
    mappings[2 * BATCH_PAGES - 1].close()
    results: list[Exception | None] = []
    for b in range(3):
        span = slice(b * BATCH_PAGES, (b + 1) * BATCH_PAGES)
        tier.save("m", addresses[span], offsets[span], results.append)
    completions.wait_for(tier, lambda: len(results) == 3)
    assert sum(isinstance(r, IllegalAddressError) for r in results) == 1 and results.count(None) == 2
    assert tier.saved_pages("m") == 2 * BATCH_PAGES  # the failed batch kept nothing
    assert tier.used_bytes == 2 * BATCH_PAGES * g and tier.warm_bytes == BATCH_PAGES * g
    assert tier.bytes_saved_total == 2 * BATCH_PAGES * g

    # Restore into the other pages after scribbling over them, a batch at a time, as the daemon does.
    good = [i for i in range(PAGES) if not BATCH_PAGES <= i < 2 * BATCH_PAGES]
    for i in good:
        device.memset(addresses[i], 0, g)
    restored: dict[int, int] = {}  # offset -> page index it was restored into

    def done(targets: list[int], got_offsets: list[int], error: Exception | None) -> None:
        assert error is None
        restored.update(zip(got_offsets, targets, strict=True))

    for start in range(0, len(good), BATCH_PAGES):
        targets = good[start : start + BATCH_PAGES]
        tier.restore("m", [addresses[i] for i in targets], lambda o, e, t=targets: done(t, o, e))
    completions.wait_for(tier, lambda: len(restored) == len(good))
    for offset, i in restored.items():
        original = (offset - 1000 * g) // g  # the page whose bytes were saved at that offset
        assert device.read(addresses[i], g) == data[original]
    assert tier.saved_pages("m") == 0 and tier.used_bytes == 0 and tier.warm_bytes == PAGES * g

    # A restore that fails gives its chunks back too: nothing stays counted, nothing leaks.
    tier.save("m", addresses[:BATCH_PAGES], offsets[:BATCH_PAGES], results.append)
    completions.wait_for(tier, lambda: len(results) == 4)
    failed: list[Exception | None] = []
    unmapped = addresses[2 * BATCH_PAGES - 1]
    tier.restore("m", [unmapped] * BATCH_PAGES, lambda o, e: failed.append(e))
    completions.wait_for(tier, lambda: failed)
    assert isinstance(failed[0], IllegalAddressError)
    assert tier.saved_pages("m") == 0 and tier.used_bytes == 0
    assert tier.trim(now=float("inf")) == PAGES  # every chunk was warm, none lost
    assert tier.warm_bytes == 0
    wait_for(lambda: not device._host_buffers, what="a copy worker to free the trimmed chunks")
    tier.close()
    tier.close()
    assert device._host_buffers == {}
    device.close()
