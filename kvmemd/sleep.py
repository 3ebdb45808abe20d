"""The sleep state machine: AWAKE -> DRAINING -> ASLEEP -> WAKING -> AWAKE.

Design note
-----------
`kvctl sleep` sends SLEEP; the engine drains (its integration's hook stops admission and
finishes or preempts work), returns its pages and says SLEPT. DRAINING becomes ASLEEP once the
engine said SLEPT and every offload copy is done. With ``--offload`` it returns the pages that
hold live blocks as OFFLOAD, with the offset each was mapped at, a batch at a time as it unmaps
them, and the daemon copies each batch to its host tier (`kvmemd.host_tier`, in jobs of
`BATCH_PAGES`, started as the batch arrives) before its pages go back to the pool. An offloading
sleep that the host tier cannot hold is refused up front.

`kvctl wake` of an offloaded model is a restore request that waits in line with the GROWs
(`kvmemd.grants`; it may wait for memory, and reclaim from others, like any request, and its
record's `waiting_for` says why it waits): as pages are found they are filled from the tier, a
job of `BATCH_PAGES` at a time, and each job's pages are sent as RESTORE as soon as they are
filled (the engine maps them while the next are copied); WAKE follows the last. A wake without a
saved cache is at once AWAKE. A model that leaves while asleep loses its saved cache; a wake then
says ``restored`` false, as it does when any saved page was lost.

Only an engine that declared a drain hook (DRAIN) is put to sleep while it holds pages: one that
did not may still be using them, and taking them would crash it. A drain that does not finish is
never left half-way. An engine has `DaemonConfig.drain_timeout`
seconds to say SLEPT; if it has not, and no page of it went to the host tier, the sleep is rolled
back: the engine gets WAKE (restored: it lost nothing), the model is AWAKE again, and its status
says why (`waiting_for`) until its next sleep or wake. An offloading drain whose copies have begun
is finishing, not stalled, and goes on.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from kvmem.common import protocol
from kvmem.common.errors import ControlError, ProtocolError
from kvmem.common.protocol import Message, MsgType
from kvmem.common.status import ModelState
from kvmemd.host_tier import BATCH_PAGES, TierFullError
from kvmemd.records import Connection, GrowRequest, ModelRecord

if TYPE_CHECKING:
    from kvmemd.daemon import Daemon

logger = logging.getLogger(__name__)


class SleepStates:
    """Moves models between the sleep states, saving and restoring their caches through the host tier."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def sleep(self, record: ModelRecord, offload: bool) -> None:
        """Ask the model's engine to drain (the `sleep` control op)."""
        tier = self.daemon.tier
        if record.client is None:
            raise ControlError(f"model {record.name!r} has no engine attached", "conflict")
        if record.state == ModelState.WAKING:
            raise ControlError(f"model {record.name!r} is waking; put it to sleep once it is awake", "conflict")
        if record.state != ModelState.AWAKE:
            return  # draining or asleep already
        if record.held and not record.client.drains:
            # Its engine may still be using its pages: taking them would crash it (a GPU engine's
            # context would be poisoned by an illegal address). Only an engine that can drain sleeps.
            raise ControlError(
                f"model {record.name!r} cannot sleep: its engine registered no drain hook and holds "
                f"{record.held} pages it may still be using (an engine integration registers one: "
                "session.on_sleep)",
                "conflict",
            )
        if offload and record.held > tier.room_pages():
            raise ControlError(
                f"the host tier has room for {tier.room_pages()} pages, model {record.name!r} holds "
                f"{record.held}: sleep without --offload, or start kvmemd with a larger --host-tier",
                "no_room",
            )
        record.state = ModelState.DRAINING
        self.daemon.sessions.size_reserve()  # a first burst's reserve is for awake engines only
        record.drain_deadline = time.monotonic() + self.daemon.config.drain_timeout
        record.waiting_for = ""
        record.sleep_offload = offload
        record.slept_reported = False
        record.offload_lost = False
        record.sleeps += 1
        self.daemon.totals["sleeps"] += 1
        self.daemon.loop.send(record.client, MsgType.SLEEP, {"offload": offload})

    def wake(self, record: ModelRecord) -> None:
        """Wake the model (the `wake` control op): at once, or through a restore request."""
        daemon = self.daemon
        if record.state == ModelState.DRAINING and record.sleep_offload:
            raise ControlError(
                f"model {record.name!r} is still saving its cache to the host tier; wake it once it is asleep",
                "conflict",
            )
        if record.state not in (ModelState.DRAINING, ModelState.ASLEEP):
            return  # awake or waking already
        record.waiting_for = ""
        record.wakes += 1
        daemon.totals["wakes"] += 1
        saved = daemon.tier.saved_pages(record.name)
        if record.client is None:
            daemon.tier.discard(record.name)
            record.state = ModelState.DETACHED
            return
        if not saved:
            record.state = ModelState.AWAKE
            self.daemon.sessions.size_reserve()
            daemon.loop.send(record.client, MsgType.WAKE, {"restored": not record.offload_lost})
            daemon.sessions.send_policy(record)
            return
        if 0 <= record.limit_pages < saved:
            raise ControlError(
                f"model {record.name!r} saved {saved} pages, over its limit of {record.limit_pages}: raise the limit",
                "conflict",
            )
        record.state = ModelState.WAKING
        record.waiting_for = ""  # set by the grant desk if the pages are not there at once
        daemon.grants.restore(record.client, saved)

    def next_drain_deadline(self) -> float | None:
        """The soonest deadline of a drain under way, if any."""
        deadlines = [r.drain_deadline for r in self.daemon.sessions.models.values() if r.state == ModelState.DRAINING]
        return min(deadlines, default=None)

    def roll_back_stalled_drains(self, now: float) -> None:
        """Wake the models whose drain passed its deadline with nothing offloaded (see the design note)."""
        for record in self.daemon.sessions.models.values():
            if record.state != ModelState.DRAINING or now < record.drain_deadline or record.client is None:
                continue
            if record.copies_in_flight or self.daemon.tier.saved_pages(record.name):
                continue  # an offload under way: finishing, not stalled
            timeout = self.daemon.config.drain_timeout
            logger.warning(
                "model %s: its drain did not finish within %g s: the sleep is rolled back", record.name, timeout
            )
            record.state = ModelState.AWAKE
            self.daemon.sessions.size_reserve()
            record.drain_deadline = float("inf")
            record.waiting_for = f"sleep rolled back: the drain did not finish within {timeout:g} s"
            self.daemon.loop.send(record.client, MsgType.WAKE, {"restored": True})
            self.daemon.sessions.send_policy(record)
            self.daemon.status.changed()

    def drain(self, conn: Connection, msg: Message) -> None:
        """DRAIN: the engine registered a drain hook (an engine cannot take one back)."""
        conn.drains = conn.drains or msg["hook"]

    def slept(self, conn: Connection, msg: Message) -> None:
        conn.model.slept_reported = True
        self._maybe_asleep(conn.model)

    def _maybe_asleep(self, record: ModelRecord) -> None:
        """DRAINING becomes ASLEEP once the engine said SLEPT and every offload copy is done."""
        if record.state == ModelState.DRAINING and record.slept_reported and record.copies_in_flight == 0:
            record.state = ModelState.ASLEEP
            self.daemon.status.changed()

    def offload(self, conn: Connection, msg: Message) -> None:
        """Pages given back during an offloading sleep: save their contents, then recycle them."""
        daemon = self.daemon
        record = conn.model
        if record.state != ModelState.DRAINING or not record.sleep_offload:
            raise ProtocolError(f"OFFLOAD while model {record.name} is not draining for an offloading sleep")
        page_ids = msg["pages"]
        if len(set(msg["offsets"])) != len(page_ids):
            raise ProtocolError("OFFLOAD names the same offset twice")
        daemon.sessions.take_back(conn, msg)
        # From here the copy jobs own the pages: each batch goes back to the pool when its job is
        # done. Batches are copied as they come (pipelined; see kvmemd.host_tier).
        for start in range(0, len(page_ids), BATCH_PAGES):
            batch = page_ids[start : start + BATCH_PAGES]
            self._save_batch(conn, batch, msg["offsets"][start : start + BATCH_PAGES])

    def _save_batch(self, conn: Connection, page_ids: list[int], offsets: list[int]) -> None:
        daemon = self.daemon
        record = conn.model
        record.copies_in_flight += 1

        def saved(error: Exception | None) -> None:
            record.copies_in_flight -= 1
            daemon.sessions.pages_back(record.name, page_ids)
            if error is not None:
                record.offload_lost = True
                logger.error("model %s: saving %d pages failed: %s", record.name, len(page_ids), error)
            if record.client is not conn or record.state != ModelState.DRAINING:
                daemon.tier.discard(record.name)  # the engine left meanwhile: nobody will restore
            self._maybe_asleep(record)

        try:
            daemon.tier.save(record.name, [daemon.pool.address_of(p) for p in page_ids], offsets, saved)
        except TierFullError as exc:
            logger.error("model %s: cannot save %d pages, their contents are lost: %s", record.name, len(page_ids), exc)
            saved(exc)

    def restore_pages(self, r: GrowRequest, page_ids: list[int]) -> None:
        """Pages granted to a wake's restore: a copy job per batch owns them until they are filled;
        `_restored` sends each batch as soon as it is (the engine maps it while the next is copied)."""
        record = r.conn.model
        record.restoring += len(page_ids)
        for start in range(0, len(page_ids), BATCH_PAGES):
            batch = page_ids[start : start + BATCH_PAGES]
            record.copies_in_flight += 1
            self.daemon.tier.restore(
                record.name,
                [self.daemon.pool.address_of(p) for p in batch],
                lambda offsets, error, batch=batch: self._restored(r, batch, offsets, error),
            )

    def _restored(self, r: GrowRequest, page_ids: list[int], offsets: list[int], error: Exception | None) -> None:
        """A batch of a wake's pages is filled from the tier: send it, and WAKE after the last."""
        daemon = self.daemon
        conn, record = r.conn, r.conn.model
        record.copies_in_flight -= 1
        record.restoring -= len(page_ids)
        if conn.closed or error is not None:
            daemon.sessions.pages_back(record.name, page_ids)
            if error is not None:
                record.offload_lost = True
                logger.error("model %s: restoring %d pages failed: %s", record.name, len(page_ids), error)
        else:
            conn.held.update(page_ids)
            for start in range(0, len(page_ids), protocol.MAX_FDS_PER_MESSAGE):
                batch = page_ids[start : start + protocol.MAX_FDS_PER_MESSAGE]
                exported = [daemon.pool.export_fd(daemon.pool.pages[p]) for p in batch]
                body = {"pages": batch, "offsets": offsets[start : start + len(batch)]}
                daemon.loop.send(
                    conn, MsgType.RESTORE, body, [fd for fd, _ in exported], close_fds=any(c for _, c in exported)
                )
        if r.remaining == 0 and record.copies_in_flight == 0 and not conn.closed:
            record.state = ModelState.AWAKE
            self.daemon.sessions.size_reserve()
            record.waiting_for = ""
            if record.offload_lost:  # some of the cache is gone: the engine must not trust any of it
                daemon.tier.discard(record.name)
            daemon.loop.send(conn, MsgType.WAKE, {"restored": not record.offload_lost})
            daemon.sessions.send_policy(record)
        daemon.status.changed()
