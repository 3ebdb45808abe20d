"""kvmemd: one daemon per GPU, wired from modules that each do one job.

Design note
-----------
Module map (each module's own note states its contract):

- `kvmemd.event_loop`: the poller, sockets, outboxes, liveness (pidfds) and the quarantine.
- `kvmemd.lane`: which engines the native grant lane serves from their own returned pages.
- `kvmemd.sessions`: HELLO, the model registry and permissions, RETURN/USAGE/LAYOUT/CHANNEL/ADOPT.
- `kvmemd.arbiter`: the arbitration policy, a pure function from the state to decisions.
- `kvmemd.grants`: the waiting requests, and carrying out the arbiter's decisions.
- `kvmemd.sleep`: the sleep state machine, with offload to and restore from `kvmemd.host_tier`.
- `kvmemd.control`: the operations `kvctl` asks for.
- `kvmemd.status`: one status snapshot, published to shared memory and returned by ``status``.
- `kvmemd.records`: the plain records they share (`ModelRecord`, `Connection`, ...).
- `kvmemd.pool`: the physical pages and the worker thread that creates, zeroes and releases them.

`Daemon` owns them, routes each message to the module whose job it is (by the sender's role:
"new" may send only HELLO), and runs the loop: wait for events, finish the host tier's copies,
serve waiting requests, publish status. Everything but the pool's worker and the host tier's
copies runs on the loop's thread.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmem.common.errors import ProtocolError
from kvmem.common.protocol import Message, MsgType
from kvmem.common.status import StatusWriter
from kvmem.device import Device
from kvmemd.control import Control
from kvmemd.event_loop import EventLoop
from kvmemd.grants import GrantDesk
from kvmemd.host_tier import HostTier
from kvmemd.lane import LaneKeeper
from kvmemd.pool import PagePool
from kvmemd.records import Connection, GrantChannel
from kvmemd.sessions import Sessions
from kvmemd.sleep import SleepStates
from kvmemd.status import StatusPublisher

logger = logging.getLogger(__name__)


@dataclass
class DaemonConfig:
    """Settings of one daemon (see `kvmemd start --help`)."""

    gpu: int
    budget_pages: int
    page_size: int
    reserve_low: int = 8
    reserve_high: int = 32
    release_after: float = 10.0
    cache_exports: bool = True
    host_tier_bytes: int = 0  # the most bytes sleeping models may keep in host memory
    drain_timeout: float = 30.0  # seconds an engine has to drain for a sleep before it is rolled back


class Daemon:
    """The daemon over an open device, a bound listening socket and a status segment.

    The caller (kvmemd.launcher) owns the lock file, the runtime directory and the device.
    """

    def __init__(self, config: DaemonConfig, device: Device, listener: socket.socket, status: StatusWriter):
        self.config = config
        self.device = device
        self.started_unix = time.time()
        self._stopping = False
        self._signals_wake_loop = False  # `install_signal_handlers` pointed signal.set_wakeup_fd at the loop
        self.totals = {"grants": 0, "denies": 0, "reclaims": 0, "sleeps": 0, "wakes": 0}
        # Called with each served request's latency in seconds (the metrics histogram), if set.
        self.observe_grant_latency: Callable[[float], None] | None = None
        self.sessions = Sessions(self)
        self.grants = GrantDesk(self)
        self.sleep = SleepStates(self)
        self.control = Control(self)
        self.status = StatusPublisher(self, status)
        self.lane = LaneKeeper(self)
        self.loop = EventLoop(
            listener,
            self._handle,
            self._client_ended,
            self.grants.forget_channel,
            self._pages_back,
            served=self.lane.sync,
            disarm=self.lane.disarm,
        )
        self.pool = PagePool(
            device,
            config.page_size,
            config.budget_pages,
            config.reserve_low,
            config.reserve_high,
            config.release_after,
            notify=self._pool_changed,
            cache_exports=config.cache_exports,
        )
        self.tier = HostTier(device, config.page_size, config.host_tier_bytes, notify=self.loop.wake)
        # What each role may send, and its handler (built once: this is the grant path).
        self._handlers: dict[str, dict[MsgType, Callable[[Connection, Message], None]]] = {
            "new": {MsgType.HELLO: self.sessions.hello},
            "engine": {
                MsgType.GROW: self.grants.grow,
                MsgType.RETURN: self.sessions.return_pages,
                MsgType.USAGE: self.sessions.usage,
                MsgType.ADOPT: self.sessions.adopt,
                MsgType.SLEPT: self.sleep.slept,
                MsgType.DRAIN: self.sleep.drain,
                MsgType.OFFLOAD: self.sleep.offload,
                MsgType.LAYOUT: self.sessions.layout,
                MsgType.CHANNEL: self.sessions.channel,
            },
            "control": {MsgType.CONTROL: self.control.handle},
        }

    def _pool_changed(self) -> None:
        """The pool's worker made, zeroed or released pages (its thread): publish them with the next turn.

        (Setting the flag is one store; the loop thread reads it after the wake-up.) Without it the pool's
        figures waited for the heartbeat, up to `kvmemd.status.HEARTBEAT_S`.
        """
        self.status.changed()
        self.loop.wake()

    def request_stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler)."""
        self._stopping = True
        self.loop.wake()

    def run(self) -> None:
        """Serve until `request_stop()` (or SIGTERM/SIGINT when installed by the caller)."""
        self.status.publish(force=True)
        while not self._stopping:
            self.loop.poll(self._timeout())
            self.tier.run_completions()
            self.tier.trim()
            self.grants.serve_pending()
            self.sleep.roll_back_stalled_drains(time.monotonic())
            self.status.publish()
        self._shutdown()

    def _timeout(self) -> float:
        timeout = self.status.timeout()
        for deadline in (self.grants.next_deadline(), self.sleep.next_drain_deadline(), self.lane.next_deadline()):
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - time.monotonic()))
        return timeout

    def _shutdown(self) -> None:
        logger.info("stopping: telling %d clients", len(self.loop.connections))
        self.lane.disarm_all()  # the credit goes back to the pool before the pool goes
        for conn in list(self.loop.connections.values()):
            if conn.role != "new":
                self.loop.send(conn, MsgType.GOODBYE, {"reason": "kvmemd is stopping"})
            self.loop.drop(conn, reason="daemon stopping", keep_pages=True)
        self.tier.close()  # finishes copies (their pages go back to the pool) before the pool goes
        self.pool.close()
        if self._signals_wake_loop:
            signal.set_wakeup_fd(-1)  # before the pipe closes: a signal must never write to a reused fd
        self.loop.close()  # last: the tier and the pool write to its wake pipe until they are closed

    def _handle(self, conn: Connection, msg: Message, channel: GrantChannel | None) -> None:
        """Route a message by its sender's role; a grant channel carries only GROW."""
        self.lane.before_message(conn, msg.type)
        if channel is not None:
            if msg.type != MsgType.GROW:
                raise ProtocolError(f"{msg.type.name} on a grant channel, which carries only GROW")
            self.grants.grow(conn, msg, channel)
            return
        handler = self._handlers[conn.role].get(msg.type)
        if handler is None:
            if conn.role == "new":
                raise ProtocolError(f"expected HELLO, got {msg.type.name}")
            raise ProtocolError(f"{msg.type.name} is not a message {conn.role} clients may send")
        handler(conn, msg)

    def _client_ended(self, conn: Connection) -> None:
        self.grants.forget_connection(conn)
        self.sessions.client_ended(conn)

    def _pages_back(self, model_name: str, page_ids: list[int]) -> None:
        self.sessions.pages_back(model_name, page_ids)


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM and SIGINT stop the daemon cleanly; SIGPIPE is ignored (send errors are handled).

    The loop's poll runs in C without the GIL (`kvmemd._grant_lane`): a signal that arrives while it
    serves, not while it waits in epoll_wait, interrupts no system call, and its Python handler would
    run only when the poll returns on its own (up to the status heartbeat later). The interpreter's
    own C-level handler writes to the wake pipe instead (`signal.set_wakeup_fd`), which ends the poll.
    """

    def stop(signum: int, frame: object) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        daemon.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.set_wakeup_fd(daemon.loop.wake_fd, warn_on_full_buffer=False)
    daemon._signals_wake_loop = True
