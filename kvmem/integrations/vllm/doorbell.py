"""Whether the daemons want something of a vLLM engine's ranks, read without asking the ranks.

Design note
-----------
With worker processes, the daemons' wishes (a limit's target, a reclaim, a sleep, a wake) reach
each rank's worker, and the scheduler learns them by asking every rank (`RankedCache.maintain`, a
`collective_rpc`). Asking costs more than the call itself: each rank reads vLLM's message queue,
and after every read a vLLM worker busy-waits (`sched_yield` in a loop) for a second before it
sleeps on a socket (vLLM 0.32 `vllm/distributed/device_communicators/shm_broadcast.py`,
`SpinCondition`, ``busy_loop_s=1``). Asking every 0.2 s therefore kept every idle worker at 100%
of a core for good; on a machine with fewer cores than workers, another server's worker bound to
the same core got 4% of it and was still importing vLLM after ten minutes.

So the scheduler asks only when there is something to ask. Every daemon publishes each model's
entry in its status segment (`kvmem.common.status`, read-only, what `kvctl status` reads; no
channel of kvmem's own between the engine's processes), and each daemon wish moves one of the
entry's fields: a limit sets `limit_pages` and `target_pages`, a reclaim counts in `reclaims`, a
sleep and a wake change `state` and count in `sleeps` / `wakes`, a reconnection gives a new
`client_id`. `DaemonDoorbell.read` returns those fields of each rank's entry (found by the
worker's pid, which the rank reports), and the scheduler asks the ranks when they changed. Pages
mapped and used are left out: they move with every grant.

The daemon publishes its status a few milliseconds after it sends a wish, so a rank's reader
thread has normally taken the wish in before the doorbell shows it; the scheduler asks once more
a tick later (`RankedCache`) in case it had not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kvmem.common.status import ModelState, StatusError, StatusReader


@dataclass(frozen=True)
class RankEntry:
    """Where a rank's model is published: its daemon's status segment and the worker's pid."""

    segment: str
    pid: int

    @classmethod
    def from_reply(cls, reply: Any) -> RankEntry | None:
        """The entry a rank reported (``{"segment": str, "pid": int}``), or None (a rank without a
        daemon: a local budget, whose wishes never change).

        Raises:
            ValueError: The reply is not of that shape.
        """
        if reply is None:
            return None
        if not (
            isinstance(reply, dict)
            and isinstance(reply.get("segment"), str)
            and isinstance(reply.get("pid"), int)
            and not isinstance(reply.get("pid"), bool)
        ):
            raise ValueError(f"kvmem: a rank reported its status entry as {reply!r}, not a segment name and a pid")
        return cls(reply["segment"], reply["pid"])


def status_entry(segment: str | None) -> dict[str, Any] | None:
    """What a rank reports to the scheduler for `DaemonDoorbell`: its daemon's status segment and this
    process's pid (None without a daemon)."""
    return None if segment is None else {"segment": segment, "pid": os.getpid()}


class DaemonDoorbell:
    """The daemon-side fields of each watched rank's status entry (see the module docstring).

    `watch` and `read` may run on different threads: `watch` replaces the watched tuple whole.
    """

    def __init__(self) -> None:
        self._entries: tuple[RankEntry | None, ...] = ()

    def watch(self, replies: list[Any]) -> None:
        """Watch the entries the ranks reported (one per rank, in rank order).

        Raises:
            ValueError: A rank's reply is malformed (`RankEntry.from_reply`).
        """
        self._entries = tuple(RankEntry.from_reply(reply) for reply in replies)

    def read(self) -> tuple[Any, ...]:
        """The wish fields of every watched rank, in rank order; equal results mean no daemon asked
        anything new between the two reads.

        A rank whose segment cannot be read (its daemon is down or starting) reads as "missing",
        one whose entry is not in the segment as "absent": both change when the daemon is back.
        The segment is opened anew on each read, so a restarted daemon's new segment is the one read.
        """
        return tuple(self._read_one(entry) for entry in self._entries)

    @staticmethod
    def _read_one(entry: RankEntry | None) -> Any:
        if entry is None:
            return None
        try:
            with StatusReader(entry.segment) as reader:
                snapshot = reader.snapshot()
        except StatusError:
            return "missing"
        daemon = (snapshot.daemon.daemon_pid, snapshot.daemon.started_unix)
        for model in snapshot.models:
            if model.pid == entry.pid and model.state != ModelState.DETACHED:
                return (
                    daemon,
                    model.client_id,
                    model.state,
                    model.limit_pages,
                    model.target_pages,
                    model.reclaims,
                    model.sleeps,
                    model.wakes,
                )
        return (daemon, "absent")
