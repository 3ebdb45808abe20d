"""The grant desk: waiting requests, and carrying out the arbiter's decisions.

Design note
-----------
A GROW becomes a `GrowRequest` in `pending` (so does a wake's restore, from `kvmemd.sleep`). On
every pass of the loop, and at once for a GROW that finds nobody waiting ahead of it, the desk
hands a plain view of the state to `kvmemd.arbiter.arbitrate` and carries out its decisions in
order: a `Grant` takes pages from the pool (the model's own dirty pages, then clean ones) and
sends them as GRANTs with their descriptors, in batches (a restore's pages go to the host tier
to be filled first); a `Deny` sends the request's final DENY; a `Reclaim` sends RECLAIM and counts
the pages as asked back until `RECLAIM_DEADLINE_MS` has passed; an `Expire` forgets such an ask.

The pool may hand out fewer pages than the arbiter granted (pages being zeroed or created):
the request keeps what it got and keeps waiting for the rest, and a DENY for its limit that
followed in the same pass is not sent (it still has room). What waiting requests still need
becomes the pool's demand, by uid, so that its worker zeroes and creates pages for them. Every
GROW's size goes to the pool as well (`PagePool.note_grow`): its warm reserve follows what the
engines ask for, so the next GROW of that size finds its pages made.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING

from kvmem.common import protocol
from kvmem.common.protocol import Message, MsgType
from kvmemd.arbiter import RECLAIM_DEADLINE_MS, Deny, Expire, Grant, Reclaim, Request, Supply, Wait, arbitrate
from kvmemd.event_loop import clip
from kvmemd.pool import Page
from kvmemd.records import Connection, GrantChannel, GrowRequest, ModelRecord

if TYPE_CHECKING:
    from kvmemd.daemon import Daemon


class GrantDesk:
    """The requests waiting for pages, and the GRANT/DENY/RECLAIM messages the decisions on them send."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.pending: list[GrowRequest] = []
        self._seq = itertools.count()

    def grow(self, conn: Connection, msg: Message, channel: GrantChannel | None = None) -> None:
        now = time.monotonic()
        if msg["pages"] > conn.largest_grow:
            conn.largest_grow = msg["pages"]
            self.daemon.sessions.size_reserve()  # its first GROW beyond a unit ends its first burst's reserve
        self.pending.append(
            GrowRequest(
                conn=conn,
                req=msg["req"],
                remaining=msg["pages"],
                deadline=now + msg["wait_ms"] / 1000,
                seq=next(self._seq),
                started=now,
                channel=channel,
                ready_only=msg["wait_ms"] == 0,
            )
        )
        if len(self.pending) == 1:
            # Nothing waits ahead of it: serve it now rather than after the rest of this pass
            # (reads of other sockets, the host tier's completions). Requests that arrive while
            # others wait are served by the loop, in the arbiter's order.
            self.serve_pending()
        # What engines ask for sizes the warm reserve, which the pool refills ahead of the next GROW
        # (after this request's own demand is declared: the pool's worker serves that first).
        self.daemon.pool.note_grow(msg["pages"])

    def restore(self, conn: Connection, pages: int) -> None:
        """Queue a wake's restore of `pages` pages from the host tier; it waits in line with the GROWs."""
        now = time.monotonic()
        self.pending.append(GrowRequest(conn, 0, pages, float("inf"), next(self._seq), now, restore=True))

    def forget_connection(self, conn: Connection) -> None:
        """Drop the requests of a connection that ended (nobody can be answered)."""
        self.pending = [r for r in self.pending if r.conn is not conn]

    def forget_channel(self, channel: GrantChannel) -> None:
        """Drop the requests made on a grant channel that ended; its engine's other requests stay."""
        self.pending = [r for r in self.pending if r.channel is not channel]

    def next_deadline(self) -> float | None:
        return min((r.deadline for r in self.pending), default=None)

    def serve_pending(self) -> None:
        """Decide every waiting request (`kvmemd.arbiter`) and carry the decisions out."""
        pool = self.daemon.pool
        if not self.pending:
            pool.set_demand({})
            return
        now = time.monotonic()
        models = self.daemon.sessions.models
        waiting = {r.seq: r for r in self.pending if not r.abandoned}
        free, coming, created, granted = pool.supply()
        lane = self.daemon.lane
        if lane.credit_pages() and (
            sum(r.remaining for r in waiting.values()) > free or any(r.restore for r in waiting.values())
        ):
            # Free pages do not cover what waits: the arbiter must weigh every page, so none stays
            # parked as an engine's credit (kvmemd.lane).
            lane.disarm_all()
            free, coming, created, granted = pool.supply()
        supply = Supply(free=free, coming=coming, created=created, budget_pages=pool.budget_pages, granted=granted)
        requests = [
            Request(r.seq, r.conn.model.name, r.remaining, r.deadline, r.restore, r.reclaim_asked, r.started)
            for r in waiting.values()
        ]
        demand: dict[int, int] = {}
        short: set[int] = set()  # requests the pool gave fewer pages than granted: they wait for the rest
        for decision in arbitrate(requests, models, supply, now):
            if isinstance(decision, Expire):
                models[decision.model].asked = 0  # the engine had its chance; the request may be repeated
                continue
            r = waiting.get(decision.seq)
            if r is None or r.abandoned:  # dropped during this pass (a failed send): the loop handled its pages
                continue
            record = r.conn.model
            if isinstance(decision, Reclaim):
                r.reclaim_asked += decision.pages
                self._ask_back(models[decision.model], decision.pages, decision.reason)
            elif isinstance(decision, Grant):
                pages = pool.take(record.name, r.conn.client_id, r.conn.uid, decision.pages)
                if pages:
                    self._grant(r, pages)
                if len(pages) < decision.pages:
                    short.add(r.seq)
                    demand[r.conn.uid] = demand.get(r.conn.uid, 0) + decision.pages - len(pages)
            elif isinstance(decision, Deny):
                if decision.reason == "limit" and r.seq in short:
                    continue  # it has room for the pages the pool owes it
                self._deny(r, decision.reason, decision.detail)
                del waiting[decision.seq]
            elif isinstance(decision, Wait):
                if r.restore:
                    record.waiting_for = decision.why
                demand[r.conn.uid] = demand.get(r.conn.uid, 0) + decision.pages
        self.pending = [r for r in waiting.values() if r.remaining > 0 and not r.abandoned]
        pool.set_demand(demand)

    def _ask_back(self, record: ModelRecord, pages: int, reason: str) -> None:
        if record.client is None:  # dropped by a failed send during this pass
            return
        record.reclaims += 1
        record.asked += pages
        record.asked_until = time.monotonic() + RECLAIM_DEADLINE_MS / 1000
        self.daemon.totals["reclaims"] += 1
        body = {"pages": pages, "deadline_ms": RECLAIM_DEADLINE_MS, "reason": reason}
        self.daemon.loop.send(record.client, MsgType.RECLAIM, body)
        self.daemon.status.changed()

    def _grant(self, r: GrowRequest, pages: list[Page]) -> None:
        daemon = self.daemon
        conn, record = r.conn, r.conn.model
        r.remaining -= len(pages)
        r.granted += len(pages)
        record.pages_granted_total += len(pages)
        if r.restore:
            daemon.sleep.restore_pages(r, [p.id for p in pages])
            return
        conn.held.update(p.id for p in pages)
        batches = protocol.batched(pages)
        for i, batch in enumerate(batches):
            exported = [daemon.pool.export_fd(p) for p in batch]
            fds = [fd for fd, _ in exported]
            close_fds = any(must_close for _, must_close in exported)
            done = r.remaining == 0 and i == len(batches) - 1
            body = {"req": r.req, "pages": [p.id for p in batch], "done": done}
            daemon.loop.send(conn, MsgType.GRANT, body, fds, close_fds=close_fds, channel=r.channel)
        if r.remaining == 0:
            record.grants += 1
            daemon.totals["grants"] += 1
            latency = time.monotonic() - r.started
            record.last_grant_us = int(latency * 1e6)
            if daemon.observe_grant_latency is not None:
                daemon.observe_grant_latency(latency)
        daemon.status.changed()

    def _deny(self, r: GrowRequest, reason: str, detail: str) -> None:
        if not (r.ready_only and reason == "budget"):
            r.conn.model.denies += 1
            self.daemon.totals["denies"] += 1
        body = {"req": r.req, "reason": reason, "detail": clip(detail), "granted": r.granted}
        self.daemon.loop.send(r.conn, MsgType.DENY, body, channel=r.channel)
        self.daemon.status.changed()
