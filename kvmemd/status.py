"""The daemon's status: one snapshot, rendered to the shared-memory segment and to the `status` reply.

Design note
-----------
`StatusPublisher.snapshot` is the one place that reads the daemon's state for status. It builds a
`DaemonStatus` and one `ModelStatus` per model (in its slot), with the field names of
`kvmem.common.status` (documented in docs/protocol.md, "Status"). Two renderings:

- the segment (`publish`): the daemon is its only writer (seqlock). Changes are published at most
  every `STATUS_MIN_INTERVAL_S` (a publish packs every slot), so readers see a change within that
  delay, well inside the 100 ms promised to `kvctl` and engines; the heartbeat at least every
  `HEARTBEAT_S`. A control change is published before its REPLY (`force`); what the pool's worker
  does (pages made, zeroed, released) is published with the loop's next turn after it says so.
- the `status` control op (`as_json`): the same fields (`kvmem.common.status.as_dict`), plus per
  model its ``layout``, which has no room in the segment's fixed slot.

`kvctl status`, `top`, `sleep --wait` and `wake --wait`, and the metrics endpoint, read the segment;
`kvctl doctor` asks for the reply.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from kvmem.common.status import MAX_SLOTS, DaemonStatus, ModelStatus, StatusWriter, as_dict

if TYPE_CHECKING:
    from kvmemd.daemon import Daemon

HEARTBEAT_S = 0.5
STATUS_MIN_INTERVAL_S = 0.005


class StatusPublisher:
    """Builds status snapshots and publishes them to the segment when something changed."""

    def __init__(self, daemon: Daemon, writer: StatusWriter):
        self.daemon = daemon
        self.writer = writer
        self.dirty = True
        self._last_publish = 0.0

    def changed(self) -> None:
        """Something the status shows changed: publish it within `STATUS_MIN_INTERVAL_S`."""
        self.dirty = True

    def timeout(self) -> float:
        """Seconds until the next publish is due."""
        if self.dirty:
            return max(0.0, self._last_publish + STATUS_MIN_INTERVAL_S - time.monotonic())
        return HEARTBEAT_S

    def snapshot(self) -> tuple[DaemonStatus, list[ModelStatus | None]]:
        """The daemon and its models now: the header, and each model's status in its slot (None: empty slot)."""
        daemon = self.daemon
        stats = daemon.pool.stats()
        # Pages parked on the grant lane as an engine's credit are granted in the pool's books, but
        # no engine holds them: free pages dirty with their model's data, as the pool would have them.
        credit = daemon.lane.credit_pages()
        tier = daemon.tier
        models = daemon.sessions.models
        header = DaemonStatus(
            daemon_pid=os.getpid(),
            gpu=daemon.config.gpu,
            page_size=daemon.config.page_size,
            budget_pages=daemon.config.budget_pages,
            pages_created=stats.created,
            pages_free=stats.free_clean + stats.free_dirty + credit,
            pages_free_clean=stats.free_clean,
            pages_granted=stats.granted - credit,
            pages_quarantined=daemon.loop.quarantined_pages(),
            heartbeat_ns=time.monotonic_ns(),
            started_unix=daemon.started_unix,
            grants=daemon.totals["grants"],
            denies=daemon.totals["denies"],
            reclaims=daemon.totals["reclaims"],
            num_models=len(models),
            device_kind=daemon.device.kind,
            device_name=daemon.device.name,
            host_tier_used_bytes=tier.used_bytes,
            host_tier_capacity_bytes=tier.capacity,
            sleeps=daemon.totals["sleeps"],
            wakes=daemon.totals["wakes"],
            pages_free_dirty=stats.free_dirty + credit,
            pages_created_total=stats.pages_created_total,
            pages_released_total=stats.pages_released_total,
            pages_scrubbed_total=stats.pages_scrubbed_total,
            out_of_memory_total=stats.out_of_memory_total,
            host_tier_warm_bytes=tier.warm_bytes,
            host_tier_saved_bytes_total=tier.bytes_saved_total,
            host_tier_restored_bytes_total=tier.bytes_restored_total,
            pages_created_for_requests_total=stats.pages_created_for_requests_total,
            reserve_low_pages=stats.reserve_low,
            reserve_high_pages=stats.reserve_high,
        )
        slots: list[ModelStatus | None] = [None] * MAX_SLOTS
        for record in models.values():
            client = record.client
            slots[record.slot] = ModelStatus(
                model=record.name,
                state=record.state,
                pid=client.pid if client else 0,
                uid=record.owner_uid,
                client_id=client.client_id if client else 0,
                limit_pages=record.limit_pages,
                min_pages=record.min_pages,
                priority=record.priority,
                mapped_pages=record.held,
                used_pages=record.used,
                target_pages=record.target_pages,
                grants=record.grants,
                denies=record.denies,
                reclaims=record.reclaims,
                pages_granted_total=record.pages_granted_total,
                pages_returned_total=record.pages_returned_total,
                last_grant_us=record.last_grant_us,
                saved_pages=tier.saved_pages(record.name),
                sleeps=record.sleeps,
                wakes=record.wakes,
                waiting_for=record.waiting_for,
            )
        return header, slots

    def publish(self, force: bool = False) -> None:
        """Write a snapshot to the segment if one is due (or `force`)."""
        now = time.monotonic()
        since = now - self._last_publish
        if not (force or (self.dirty and since >= STATUS_MIN_INTERVAL_S) or since >= HEARTBEAT_S):
            return
        self.writer.publish(*self.snapshot())
        self.dirty = False
        self._last_publish = now

    def as_json(self) -> dict[str, Any]:
        """The `status` control op's reply: a snapshot's fields, and each model's layout."""
        header, slots = self.snapshot()
        models = self.daemon.sessions.models
        return {
            "daemon": as_dict(header),
            "models": [as_dict(m) | {"layout": models[m.model].layout} for m in slots if m is not None],
        }
