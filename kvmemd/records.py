"""What the daemon keeps per model, per client connection, per grant channel and per waiting request.

Design note
-----------
Plain records, no behaviour beyond derived values: every change to them is made by the module
whose job it is (sessions, the grant desk, sleep, control), always on the event loop's thread.

Invariants:
- A `Connection` is an engine, a control client, or "new" until its HELLO. An engine's
  `held` is the set of page ids it holds, except those the native grant lane granted it while it
  is armed (`lane_held` counts them, as of the lane's last poll; `kvmemd.lane` adds their ids to
  `held` when it disarms the engine, before anything else looks at the set); `ModelRecord.held`
  is their sum (0 while detached) plus the pages being restored for the model (`restoring`).
- `ModelRecord.client` is the engine connection attached for the model, or None; a model
  outlives its engines (its policy and counters stay) until its slot is needed.
- `ModelRecord.asked` counts pages asked back (RECLAIM) and not yet returned; the ask lapses at
  `asked_until` (`kvmemd.arbiter` says when to forget it). Never ask below the minimum.
"""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kvmem.common.status import ModelState

# A frame waiting to be sent, with its descriptors and whether to close them once sent.
Outgoing = tuple[bytes, list[int], bool]


@dataclass
class ModelRecord:
    """What the daemon knows of a model: its policy, its engine connection, its counters."""

    name: str
    owner_uid: int
    slot: int
    limit_pages: int = -1
    min_pages: int = 0
    priority: int = 0
    state: ModelState = ModelState.DETACHED
    client: Connection | None = None
    layout: dict[str, Any] | None = None  # the engine's KVLayout descriptor, once it sent one
    grants: int = 0
    denies: int = 0
    reclaims: int = 0
    pages_granted_total: int = 0
    pages_returned_total: int = 0
    last_grant_us: int = 0
    sleeps: int = 0
    wakes: int = 0
    # Sleep: whether this sleep offloads, whether the engine said SLEPT, copies still running,
    # and whether any saved content was lost (then the wake says restored=False).
    sleep_offload: bool = False
    slept_reported: bool = False
    copies_in_flight: int = 0
    offload_lost: bool = False
    # For status: why a wake (restore) still waits, or why the last sleep was rolled back.
    waiting_for: str = ""
    drain_deadline: float = float("inf")  # when a drain that has not finished is rolled back (monotonic)
    # Pages asked back and not yet returned (the ask lapses at `asked_until`, monotonic seconds).
    asked: int = 0
    asked_until: float = 0.0
    # Pages granted to a wake's restore and still being filled from the host tier: the model's already
    # (a limit counts them), though its engine gets them only once filled (`kvmemd.sleep`).
    restoring: int = 0

    @property
    def attached(self) -> bool:
        """Whether an engine is connected for it."""
        return self.client is not None

    @property
    def held(self) -> int:
        """Pages the model holds: its engine's, and those being restored for it."""
        client = self.client
        return (len(client.held) + client.lane_held if client else 0) + self.restoring

    @property
    def used(self) -> int:
        """Pages holding live KV blocks, as the engine last reported (0 while detached)."""
        return self.client.used_pages if self.client else 0

    @property
    def target_pages(self) -> int:
        """What the engine should shrink to: 0 while it sleeps, its limit while above it, else -1 (none)."""
        if self.state in (ModelState.DRAINING, ModelState.ASLEEP):
            return 0
        return self.limit_pages if 0 <= self.limit_pages < self.held else -1


@dataclass(eq=False)
class Connection:
    """A client socket: its peer's credentials (SO_PEERCRED), its role, and what it holds."""

    sock: socket.socket
    pid: int
    uid: int
    gid: int
    client_id: int
    role: str = "new"  # "new" until HELLO, then "engine" or "control"
    model: ModelRecord | None = None
    pidfd: int | None = None
    held: set[int] = field(default_factory=set)
    # The native grant lane (`kvmemd.lane`): whether it serves this engine, the pages it granted it
    # and the engine has not returned, and the largest GROW the engine sent (the lane's credit cap).
    armed: bool = False
    lane_held: int = 0
    largest_grow: int = 0
    used_pages: int = 0
    adopt_expected: int = 0
    drains: bool = False  # the engine declared a drain hook (DRAIN): it may be put to sleep holding pages
    channel: GrantChannel | None = None
    outbox: deque[Outgoing] = field(default_factory=deque)
    writing: bool = False  # registered for EVENT_WRITE: the outbox waits for room
    closed: bool = False


@dataclass(eq=False)
class GrantChannel:
    """An engine's grant channel (see `kvmemd.sessions`): GROW in, its GRANTs and DENY out."""

    sock: socket.socket
    owner: Connection
    outbox: deque[Outgoing] = field(default_factory=deque)
    writing: bool = False
    closed: bool = False


@dataclass(eq=False)
class GrowRequest:
    """A GROW (or a wake's restore) waiting for pages; `seq` orders arrivals and names it to the arbiter."""

    conn: Connection
    req: int
    remaining: int
    deadline: float
    seq: int
    started: float
    granted: int = 0
    reclaim_asked: int = 0
    restore: bool = False  # a wake's restore from the host tier, not an engine's GROW
    channel: GrantChannel | None = None  # where the answers go, if the GROW came on a channel
    # A GROW with no wait (`PageSource.acquire_ready`): it asks for what is free now, so the DENY of
    # the rest for want of free pages ("budget") is its expected answer, not counted as a denial.
    ready_only: bool = False

    @property
    def abandoned(self) -> bool:
        """Whether nobody can receive the answer any more (connection or channel gone)."""
        return self.conn.closed or (self.channel is not None and self.channel.closed)
