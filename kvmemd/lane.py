"""The native grant lane's policy: which engines it serves, and the daemon's records while it does.

Design note
-----------
`kvmemd._grant_lane` (its design note says how) serves an armed engine's GROWs from its *credit*,
pages that engine itself just returned, and takes back its RETURNs of the pages it granted, inside
the event loop's poll and without running Python. This module decides when it may, and keeps
every record true.

Arming. When the daemon has handled an engine's RETURN, the returned pages may stay parked on the
lane as that engine's credit instead of going back to the pool, when nothing the arbiter weighs
could tell that apart from the engine keeping them: the model is awake, nothing is asked back from
it and it has no target (`target_pages` < 0), no wake is restoring its pages, no request of any
engine waits at the grant desk, the engine has a grant channel with nothing queued on it, and the
pool keeps each page's exported descriptor (the lane sends those). The credit holds at most the
engine's largest GROW (and one message's descriptors): what it may ask for next.

While armed, the lane grants only within the model's limit (pages held + asked <= limit), only a
GROW it can serve in full, and only the engine's own pages (the same model and uid: nothing to
zero, as `kvmemd.pool.PagePool.take` would hand them back to it first anyway).

Disarming gives the credit back to the pool (dirty with the model's data, as a RETURN would have)
and adds the ids the lane granted to the engine's `held`. It happens before anything that may look
at or change what the engine holds or may hold:
- a message from the engine that the lane did not serve (except USAGE and LAYOUT, which change
  neither);
- requests waiting at the grant desk that the free pages do not cover (or a wake's restore):
  every engine is disarmed, so that the arbiter weighs every page (`kvmemd.grants`);
- a POLICY, RECLAIM, SLEEP, WAKE or GOODBYE sent to the engine (an operator's `kvctl limit`, `min`
  or `priority` always sends a POLICY, `sleep` a SLEEP, `wake` a WAKE), the end of its connection
  or of its grant channel (`kvmemd.event_loop`);
- credit unused for `CREDIT_IDLE_S`: its pages go back to the pool, which sizes its reserve and
  releases surplus from what it sees.

Counting. After each poll `sync` adds what the lane served to the records (grants, pages granted
and returned, the last grant's latency, the metrics histogram), and `Connection.lane_held` keeps
the model's `held` exact. The status shows credit pages as free and dirty, not granted.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from kvmem.common import protocol
from kvmem.common.protocol import MsgType
from kvmem.common.status import ModelState
from kvmemd import _grant_lane
from kvmemd.records import Connection

if TYPE_CHECKING:
    from kvmemd.daemon import Daemon

# Credit nobody used for this long goes back to the pool.
CREDIT_IDLE_S = 0.5
# The limit the lane is given for a model without one.
_NO_LIMIT = 2**62
# Messages that change neither what an engine holds nor what it may hold: they leave it armed.
_LEAVE_ARMED = frozenset({MsgType.USAGE, MsgType.LAYOUT})


def _check_protocol_facts() -> None:
    """The lane's C code writes and reads frames itself: what it assumes must be what the protocol says."""
    expected = {
        "magic": protocol.MAGIC.decode(),
        "header_size": protocol.HEADER.size,
        "max_frame": protocol.MAX_FRAME,
        "max_fds_per_message": protocol.MAX_FDS_PER_MESSAGE,
        "grow": int(MsgType.GROW),
        "return": int(MsgType.RETURN),
        "grant": int(MsgType.GRANT),
        "max_return_ids": protocol.MAX_RETURN_IDS,
        "max_pages_per_request": protocol.MAX_PAGES_PER_REQUEST,
        "max_wait_ms": protocol.SCHEMAS[MsgType.GROW]["wait_ms"].hi,
    }
    if expected != _grant_lane.PROTOCOL_FACTS:
        raise ImportError(
            f"kvmemd/_grant_lane.c assumes {_grant_lane.PROTOCOL_FACTS}, the protocol says {expected}: "
            "rebuild the extension (pip install -e .) or update its constants"
        )


_check_protocol_facts()


class LaneKeeper:
    """Arms and disarms engines on the native grant lane (`kvmemd.event_loop.EventLoop.lane`)."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self._armed: dict[int, Connection] = {}  # by client id

    def credit_pages(self) -> int:
        """Pages parked on the lane as engines' credit: granted in the pool's books, held by no engine."""
        return self.daemon.loop.lane.credit if self._armed else 0

    def park(self, conn: Connection, page_ids: list[int]) -> list[int]:
        """`conn` returned `page_ids` (already off its `held`): the ids that go back to the pool.

        The others stay on the lane as the engine's credit, and the engine is armed (see the design note).
        """
        cap = min(conn.largest_grow, protocol.MAX_FDS_PER_MESSAGE)
        if not page_ids or cap < 1 or conn.armed or not self._may_arm(conn):
            return page_ids
        keep, rest = page_ids[-cap:], page_ids[:-cap]
        pool = self.daemon.pool
        credit = [(page_id, pool.export_fd(pool.pages[page_id])[0]) for page_id in keep]
        record = conn.model
        assert record is not None and conn.channel is not None  # (checked by _may_arm)
        held = len(conn.held)
        limit = record.limit_pages if record.limit_pages >= 0 else _NO_LIMIT
        self.daemon.loop.lane.arm(
            conn.client_id, conn.sock.fileno(), conn.channel.sock.fileno(), held, max(limit, held), cap, credit
        )
        conn.armed = True
        self._armed[conn.client_id] = conn
        return rest

    def _may_arm(self, conn: Connection) -> bool:
        record, channel, daemon = conn.model, conn.channel, self.daemon
        return (
            conn.role == "engine"
            and not conn.closed
            and record is not None
            and record.client is conn
            and channel is not None
            and not channel.closed
            and not channel.outbox
            and record.state == ModelState.AWAKE
            and record.asked == 0
            and record.target_pages < 0
            and record.restoring == 0
            and not daemon.grants.pending
            and daemon.pool.cache_exports
        )

    def before_message(self, conn: Connection, msg_type: MsgType) -> None:
        """A message from `conn` that the lane did not serve is about to be handled."""
        if conn.armed and msg_type not in _LEAVE_ARMED:
            self.disarm(conn)

    def disarm(self, conn: Connection) -> None:
        """Stop serving `conn`: its credit goes back to the pool, what the lane granted it into `held`."""
        if not conn.armed:
            return
        counters, credit, granted = self.daemon.loop.lane.disarm(conn.client_id)
        conn.armed = False
        del self._armed[conn.client_id]
        self._count(conn, counters)
        conn.lane_held = 0
        conn.held.update(granted)
        if credit:
            assert conn.model is not None
            self.daemon.pool.give_back(credit, conn.model.name)
        self.daemon.status.changed()

    def disarm_all(self) -> None:
        for conn in list(self._armed.values()):
            self.disarm(conn)

    def sync(self) -> None:
        """After a poll: what the lane served into the records; idle credit back to the pool."""
        if not self._armed:
            return
        lane = self.daemon.loop.lane
        lane.record_latencies = self.daemon.observe_grant_latency is not None
        for counters in lane.take_counters():
            self._count(self._armed[counters[0]], counters)
        deadline = self.next_deadline()
        if deadline is not None and deadline <= time.monotonic():
            now = time.monotonic()
            for conn in list(self._armed.values()):
                if lane.last_active(conn.client_id) + CREDIT_IDLE_S <= now:
                    self.disarm(conn)

    def next_deadline(self) -> float | None:
        """When the earliest credit falls idle (monotonic seconds), or None when no engine is armed."""
        if not self._armed:
            return None
        lane = self.daemon.loop.lane
        return min(lane.last_active(client_id) for client_id in self._armed) + CREDIT_IDLE_S

    def _count(self, conn: Connection, counters: tuple[int, int, int, int, int, list[float]]) -> None:
        _, lane_held, grants, pages_granted, pages_returned, latencies = counters
        conn.lane_held = lane_held
        if not (grants or pages_returned):
            return
        record = conn.model
        assert record is not None
        record.grants += grants
        record.pages_granted_total += pages_granted
        record.pages_returned_total += pages_returned
        self.daemon.totals["grants"] += grants
        if latencies:
            record.last_grant_us = int(latencies[-1] * 1e6)
            observe = self.daemon.observe_grant_latency
            if observe is not None:
                for latency in latencies:
                    observe(latency)
        self.daemon.status.changed()
