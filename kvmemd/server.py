"""kvmemd's event loop: connections, grants, arbitration, liveness, status publishing.

Design note
-----------
One thread runs a `selectors` loop over the listening socket, every client socket, a wake pipe
(written by the page pool's worker and by signals) and a pidfd per engine process. All
accounting lives on this thread; the pool's worker only creates, zeroes and releases pages.

Engines and kvctl connect to one ``SOCK_SEQPACKET`` socket and speak `kvmem.common.protocol`. Who is
calling comes from ``SO_PEERCRED`` (pid, uid), never from the message.

An engine may add a grant channel: a socket of its own (one end of a socketpair it made, sent in
a CHANNEL message and checked to belong to the same process) on which it sends only GROW, and on
which the daemon answers that GROW's GRANTs and DENY. The engine then reads its grant on the
thread that asked for it instead of through its reader thread. A channel that closes ends only
itself (and its waiting requests); its engine's connection and pages stay.

Grants. A GROW request becomes a `GrowRequest`. On every pass the loop serves waiting requests in
order: models below their guaranteed minimum first, then higher priority, then arrival. A model's
limit caps what it may hold; pages come from the pool (the model's own dirty pages, then clean
ones). What is still missing becomes demand for the pool's worker (zero dirty pages, create new
ones under the budget); when the budget is spent, the loop asks other models above their minimum
to give free pages back (RECLAIM; lowest priority first, then the most idle pages). A request
that is still short at its deadline gets a DENY saying why (limit, budget, asleep).

Liveness. A socket that closes, or an engine process whose pidfd becomes readable, ends the
client. Its pages go back to the pool (dirty, so they are zeroed before another model gets them)
only once its process is gone: a process that closed its socket but still runs may still map
them, so they stay quarantined until its pidfd says it exited.

Sleep. `kvctl sleep` sends SLEEP; the engine drains (its integration's hook stops admission and
finishes or preempts work), returns its pages and says SLEPT. With ``--offload`` it returns the
pages that hold live blocks as OFFLOAD, with the offset each was mapped at, and the daemon copies
them to its host tier (`kvmemd.host_tier`) before they go back to the pool. `kvctl wake` of an
offloaded model is a restore request that waits in line with the GROWs: as pages are found they
are filled from the tier and sent as RESTORE; WAKE follows the last. States: AWAKE -> DRAINING ->
ASLEEP -> WAKING -> AWAKE.

Restarts. Clients keep their pages when the daemon dies. When a daemon starts, engines reconnect,
send their pages back as descriptors (ADOPT) and get new page ids; the pages count as created and
granted from then on.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmem.common import protocol
from kvmem.common.errors import ControlError, ProtocolError
from kvmem.common.layout import KVLayout
from kvmem.common.protocol import Message, MsgType
from kvmem.common.status import MAX_SLOTS, DaemonStatus, ModelState, ModelStatus, StatusWriter
from kvmem.device import Device, DeviceError
from kvmemd.host_tier import HostTier, TierFullError
from kvmemd.pool import Page, PagePool

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
# Changes are published at most this often (a publish packs every slot); readers see a change
# within this delay, well inside the 100 ms promised to `kvctl` and engines.
STATUS_MIN_INTERVAL_S = 0.005
RECLAIM_DEADLINE_MS = 2_000


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
    geometry: dict[str, Any] | None = None
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
    waiting_for: str = ""  # why a wake (restore) is still waiting, for status
    # Pages asked back and not yet returned (until `asked_until`): never ask below the minimum.
    asked: int = 0
    asked_until: float = 0.0

    @property
    def askable(self) -> int:
        """Pages that may still be asked back without going below the minimum."""
        if self.asked and time.monotonic() > self.asked_until:
            self.asked = 0  # the engine had its chance; the request may be repeated
        return max(0, self.held - self.min_pages - self.asked)

    @property
    def held(self) -> int:
        return len(self.client.held) if self.client else 0

    @property
    def target_pages(self) -> int:
        if self.state in (ModelState.DRAINING, ModelState.ASLEEP):
            return 0
        return self.limit_pages if 0 <= self.limit_pages < self.held else -1


@dataclass(eq=False)
class Connection:
    sock: socket.socket
    pid: int
    uid: int
    gid: int
    client_id: int
    role: str = "new"  # "new" until HELLO, then "engine" or "control"
    model: ModelRecord | None = None
    pidfd: int | None = None
    held: set[int] = field(default_factory=set)
    used_pages: int = 0
    adopt_expected: int = 0
    channel: GrantChannel | None = None
    # Frames waiting to be sent, with their descriptors and whether to close them once sent.
    outbox: deque[tuple[bytes, list[int], bool]] = field(default_factory=deque)
    writing: bool = False  # registered for EVENT_WRITE: the outbox waits for room
    closed: bool = False


@dataclass(eq=False)
class GrantChannel:
    """An engine's grant channel (see the design note): GROW in, its GRANTs and DENY out."""

    sock: socket.socket
    owner: Connection
    outbox: deque[tuple[bytes, list[int], bool]] = field(default_factory=deque)
    writing: bool = False
    closed: bool = False


@dataclass
class GrowRequest:
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

    @property
    def abandoned(self) -> bool:
        """Whether nobody can receive the answer any more (connection or channel gone)."""
        return self.conn.closed or (self.channel is not None and self.channel.closed)


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


class Daemon:
    """The event loop over an open device, a bound listening socket and a status segment.

    The caller (kvmemd.cli) owns the lock file, the runtime directory and the device.
    """

    def __init__(self, config: DaemonConfig, device: Device, listener: socket.socket, status: StatusWriter):
        self.config = config
        self.device = device
        self.listener = listener
        self.status = status
        self.started_unix = time.time()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pool = PagePool(
            device,
            config.page_size,
            config.budget_pages,
            config.reserve_low,
            config.reserve_high,
            config.release_after,
            notify=self._wake,
            cache_exports=config.cache_exports,
        )
        self.tier = HostTier(device, config.page_size, config.host_tier_bytes, notify=self._wake)
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, ("listen", None))
        self.selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.models: dict[str, ModelRecord] = {}
        self.connections: dict[int, Connection] = {}  # by client id
        self.pending: list[GrowRequest] = []
        self.quarantine: dict[int, tuple[str, list[int]]] = {}  # pidfd -> (model, page ids)
        self._client_ids = itertools.count(1)
        self._seq = itertools.count()
        self._stopping = False
        self._status_dirty = True
        self._last_publish = 0.0
        self.totals = {"grants": 0, "denies": 0, "reclaims": 0, "sleeps": 0, "wakes": 0}
        # Called with each served request's latency in seconds (the metrics histogram), if set.
        self.observe_grant_latency: Callable[[float], None] | None = None
        # What each role may send, and its handler (built once: this is the grant path).
        self._handlers: dict[str, dict[MsgType, Callable[[Connection, Message], None]]] = {
            "engine": {
                MsgType.GROW: self._grow,
                MsgType.RETURN: self._return,
                MsgType.USAGE: self._usage,
                MsgType.ADOPT: self._adopt,
                MsgType.SLEPT: self._slept,
                MsgType.OFFLOAD: self._offload,
                MsgType.LAYOUT: self._layout,
                MsgType.CHANNEL: self._channel,
            },
            "control": {MsgType.CONTROL: self._control},
        }

    # ---- lifecycle ----

    def request_stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler)."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the loop is going to wake anyway

    def run(self) -> None:
        """Serve until `request_stop()` (or SIGTERM/SIGINT when installed by the caller)."""
        self._publish(force=True)
        while not self._stopping:
            for key, mask in self.selector.select(self._timeout()):
                kind, obj = key.data
                if kind == "listen":
                    self._accept()
                elif kind == "wake":
                    self._drain_wake()
                elif kind == "conn":
                    if mask & selectors.EVENT_WRITE:
                        self._flush(obj)
                    if mask & selectors.EVENT_READ and not obj.closed:
                        self._read(obj)
                elif kind == "channel":
                    if mask & selectors.EVENT_WRITE:
                        self._flush(obj)
                    if mask & selectors.EVENT_READ and not obj.closed:
                        self._read(obj.owner, obj)
                elif kind == "pidfd":
                    self._process_exited(key.fd, obj)
            self.tier.run_completions()
            self.tier.trim()
            self._serve_pending()
            self._publish()
        self._shutdown()

    def _timeout(self) -> float:
        timeout = HEARTBEAT_S
        if self._status_dirty:
            timeout = max(0.0, self._last_publish + STATUS_MIN_INTERVAL_S - time.monotonic())
        if self.pending:
            soonest = min(r.deadline for r in self.pending)
            timeout = min(timeout, max(0.0, soonest - time.monotonic()))
        return timeout

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass  # drained

    def _shutdown(self) -> None:
        logger.info("stopping: telling %d clients", len(self.connections))
        for conn in list(self.connections.values()):
            if conn.role != "new":
                self._send(conn, MsgType.GOODBYE, {"reason": "kvmemd is stopping"})
            self._drop(conn, reason="daemon stopping", keep_pages=True)
        for pidfd in list(self.quarantine):
            self.selector.unregister(pidfd)
            os.close(pidfd)
        self.quarantine.clear()
        self.selector.close()
        self.tier.close()  # finishes copies (their pages go back to the pool) before the pool goes
        self.pool.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- connections ----

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    logger.error("cannot accept a client: %s", exc)
                    return
                raise
            sock.setblocking(False)
            pid, uid, gid = protocol.peer_credentials(sock)
            conn = Connection(sock, pid, uid, gid, next(self._client_ids))
            self.connections[conn.client_id] = conn
            self.selector.register(sock, selectors.EVENT_READ, ("conn", conn))
            logger.debug("client %d connected: pid %d uid %d", conn.client_id, pid, uid)

    def _read(self, conn: Connection, channel: GrantChannel | None = None) -> None:
        """Handle what `conn` sent, on its connection or on its grant `channel`."""
        sock = conn.sock if channel is None else channel.sock
        for _ in range(64):  # bounded, so one chatty client cannot starve the others
            try:
                frame, fds = protocol.receive_frame(sock)
            except BlockingIOError:
                return
            except (protocol.ConnectionClosed, OSError) as exc:
                closed = isinstance(exc, protocol.ConnectionClosed)
                reason = "closed the connection" if closed else f"socket error: {exc}"
                if channel is None:
                    self._drop(conn, reason=reason)
                else:
                    self._drop_channel(channel, reason=reason)
                return
            except ProtocolError as exc:
                self._fatal(conn, str(exc))
                return
            try:
                msg = protocol.decode(frame, fds)
            except ProtocolError as exc:
                protocol.close_fds(fds)
                self._fatal(conn, str(exc))
                return
            try:
                if channel is None:
                    self._handle(conn, msg)
                elif msg.type == MsgType.GROW:
                    self._grow(conn, msg, channel)
                else:
                    raise ProtocolError(f"{msg.type.name} on a grant channel, which carries only GROW")
            except ProtocolError as exc:
                self._fatal(conn, str(exc))
                return
            finally:
                # Handlers never keep received descriptors (importing a page dups it).
                protocol.close_fds(msg.fds)
            if conn.closed or (channel is not None and channel.closed):
                return

    def _fatal(self, conn: Connection, message: str) -> None:
        """A protocol violation: tell the client why, then drop only this connection."""
        logger.warning("client %d (pid %d): %s", conn.client_id, conn.pid, message)
        self._send(conn, MsgType.ERROR, {"message": _clip(message)})
        self._drop(conn, reason=f"protocol error: {message}")

    def _send(
        self,
        conn: Connection,
        msg_type: MsgType,
        body: dict[str, Any],
        fds: list[int] | None = None,
        close_fds: bool = True,
        channel: GrantChannel | None = None,
    ) -> None:
        """Queue one message to `conn`, or on its grant `channel`.

        With `close_fds`, `fds` are closed once sent (or the connection drops).
        """
        fds = fds or []
        endpoint = conn if channel is None else channel
        if endpoint.closed:
            if close_fds:
                protocol.close_fds(fds)
            return
        try:
            frame = protocol.encode(msg_type, body)
        except ProtocolError as exc:
            # A message this daemon built breaks the protocol (a bug): it costs this connection,
            # never the daemon.
            logger.error("cannot send %s to client %d: %s", msg_type.name, conn.client_id, exc)
            if close_fds:
                protocol.close_fds(fds)
            self._drop(conn, reason=f"internal error building {msg_type.name}")
            return
        endpoint.outbox.append((frame, fds, close_fds))
        if len(endpoint.outbox) == 1:
            self._flush(endpoint)

    def _flush(self, endpoint: Connection | GrantChannel) -> None:
        """Send what `endpoint` has queued, until the socket is full (then wait for EVENT_WRITE)."""
        while endpoint.outbox and not endpoint.closed:
            frame, fds, close_fds = endpoint.outbox[0]
            try:
                endpoint.sock.sendmsg([frame], protocol.ancillary_for(fds))
            except BlockingIOError:
                if not endpoint.writing:
                    endpoint.writing = True
                    events = selectors.EVENT_READ | selectors.EVENT_WRITE
                    self.selector.modify(endpoint.sock, events, self._key(endpoint))
                return
            except OSError as exc:
                if isinstance(endpoint, GrantChannel):
                    self._drop_channel(endpoint, reason=f"send failed: {exc}")
                else:
                    self._drop(endpoint, reason=f"send failed: {exc}")
                return
            endpoint.outbox.popleft()
            if close_fds:
                protocol.close_fds(fds)
        if endpoint.writing and not endpoint.closed:
            endpoint.writing = False
            self.selector.modify(endpoint.sock, selectors.EVENT_READ, self._key(endpoint))

    @staticmethod
    def _key(endpoint: Connection | GrantChannel) -> tuple[str, Connection | GrantChannel]:
        return ("channel" if isinstance(endpoint, GrantChannel) else "conn", endpoint)

    def _drop(self, conn: Connection, reason: str, keep_pages: bool = False) -> None:
        """End a client. Its pages return to the pool once its process is gone."""
        if conn.closed:
            return
        conn.closed = True
        logger.info("client %d (pid %d, %s) ends: %s", conn.client_id, conn.pid, conn.role, reason)
        if conn.channel is not None:
            self._drop_channel(conn.channel, reason="its connection ended")
        self._close_socket(conn)
        del self.connections[conn.client_id]
        self.pending = [r for r in self.pending if r.conn is not conn]
        if conn.pidfd is not None:
            self.selector.unregister(conn.pidfd)
        record = conn.model
        if record is not None and record.client is conn:
            record.client = None
            if record.state != ModelState.ASLEEP:
                record.state = ModelState.DETACHED
            # The saved cache is only of use to the engine that saved it.
            if self.tier.discard(record.name):
                record.offload_lost = True
        self._status_dirty = True
        held = sorted(conn.held)
        conn.held.clear()
        if keep_pages or not held:
            if conn.pidfd is not None:
                os.close(conn.pidfd)
            return
        model_name = record.name if record else ""
        if conn.pidfd is None or _has_exited(conn.pidfd):
            if conn.pidfd is not None:
                os.close(conn.pidfd)
            self._pages_back(model_name, held)
        else:
            # The process still runs and may still map these pages: hold them until it exits.
            logger.warning("pid %d closed its socket holding %d pages: quarantined until it exits", conn.pid, len(held))
            self.quarantine[conn.pidfd] = (model_name, held)
            self.selector.register(conn.pidfd, selectors.EVENT_READ, ("pidfd", None))

    def _close_socket(self, endpoint: Connection | GrantChannel) -> None:
        """Stop watching and close `endpoint`'s socket; descriptors it had yet to send are closed."""
        self.selector.unregister(endpoint.sock)
        endpoint.sock.close()
        for _, fds, close_fds in endpoint.outbox:
            if close_fds:
                protocol.close_fds(fds)
        endpoint.outbox.clear()

    def _drop_channel(self, channel: GrantChannel, reason: str) -> None:
        """End a grant channel and the requests waiting on it; its engine stays attached."""
        if channel.closed:
            return
        channel.closed = True
        conn = channel.owner
        logger.debug("client %d: grant channel ends: %s", conn.client_id, reason)
        self._close_socket(channel)
        conn.channel = None
        self.pending = [r for r in self.pending if r.channel is not channel]

    def _process_exited(self, pidfd: int, conn: Connection | None) -> None:
        if conn is not None:  # an engine process died with its socket still open somewhere
            self._drop(conn, reason="process exited")
            return
        model_name, held = self.quarantine.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        self._pages_back(model_name, held)

    def _pages_back(self, model_name: str, page_ids: list[int], routine: bool = False) -> None:
        """Pages back in the pool. `routine`: an engine returned them (logged at debug, not info:
        a log record costs more than the rest of a RETURN, and engines return pages all the time)."""
        self.pool.give_back(page_ids, model_name)
        record = self.models.get(model_name)
        if record is not None:
            record.pages_returned_total += len(page_ids)
        self._status_dirty = True
        logger.log(
            logging.DEBUG if routine else logging.INFO,
            "%d pages of %s back in the pool",
            len(page_ids),
            model_name or "an unknown model",
        )

    # ---- messages ----

    def _handle(self, conn: Connection, msg: Message) -> None:
        if conn.role == "new":
            if msg.type != MsgType.HELLO:
                raise ProtocolError(f"expected HELLO, got {msg.type.name}")
            self._hello(conn, msg)
            return
        handler = self._handlers[conn.role].get(msg.type)
        if handler is None:
            raise ProtocolError(f"{msg.type.name} is not a message a {conn.role} client may send")
        handler(conn, msg)

    def _hello(self, conn: Connection, msg: Message) -> None:
        if msg["version"] != protocol.PROTOCOL_VERSION:
            raise ProtocolError(f"client speaks protocol {msg['version']}, this daemon {protocol.PROTOCOL_VERSION}")
        if msg["role"] == "control":
            conn.role = "control"
            self._welcome(conn, slot=-1)
            return
        name = msg["model"]
        if name is None:
            raise ProtocolError("an engine's HELLO must name its model")
        if msg["adopt"] and msg["page_size"] != self.config.page_size:
            raise ProtocolError(
                f"client holds pages of {msg['page_size']} bytes; this daemon's pages are {self.config.page_size}"
            )
        record = self.models.get(name)
        if record is not None and record.client is not None:
            raise ProtocolError(f"model {name!r} is already attached by pid {record.client.pid}")
        if record is not None and not self._may_manage(conn.uid, record):
            raise ProtocolError(f"model {name!r} belongs to uid {record.owner_uid}; uid {conn.uid} may not attach")
        if record is None:
            record = self._new_record(name, conn.uid)
            if record is None:
                raise ProtocolError(f"the daemon already tracks {MAX_SLOTS} models; detach one first")
        conn.role = "engine"
        conn.model = record
        conn.adopt_expected = msg["adopt"]
        record.client = conn
        record.geometry = msg["geometry"]
        if record.state != ModelState.ASLEEP:
            record.state = ModelState.AWAKE
        try:
            conn.pidfd = os.pidfd_open(conn.pid)
            self.selector.register(conn.pidfd, selectors.EVENT_READ, ("pidfd", conn))
        except OSError:
            conn.pidfd = None  # already gone: EOF will follow
        self._welcome(conn, slot=record.slot)
        self._send_policy(record)
        if record.state == ModelState.ASLEEP:
            self._send(conn, MsgType.SLEEP, {"offload": False})
        self._status_dirty = True
        logger.info("model %s attached: pid %d uid %d", name, conn.pid, conn.uid)

    def _welcome(self, conn: Connection, slot: int) -> None:
        self._send(
            conn,
            MsgType.WELCOME,
            {
                "version": protocol.PROTOCOL_VERSION,
                "client_id": conn.client_id,
                "slot": slot,
                "page_size": self.config.page_size,
                "device_kind": self.device.kind,
                "device_ordinal": self.device.ordinal,
                "budget_pages": self.config.budget_pages,
            },
        )

    def _new_record(self, name: str, uid: int) -> ModelRecord | None:
        used = {r.slot for r in self.models.values()}
        free = next((s for s in range(MAX_SLOTS) if s not in used), None)
        if free is None:
            self._forget_idle_records()
            used = {r.slot for r in self.models.values()}
            free = next((s for s in range(MAX_SLOTS) if s not in used), None)
            if free is None:
                return None
        record = ModelRecord(name=name, owner_uid=uid, slot=free)
        self.models[name] = record
        return record

    def _forget_idle_records(self) -> None:
        """Drop detached models that hold nothing and have no policy, to free their slots."""
        for name, r in list(self.models.items()):
            idle = r.client is None and r.copies_in_flight == 0 and not self.tier.saved_pages(name)
            if idle and r.limit_pages < 0 and r.min_pages == 0 and r.priority == 0:
                del self.models[name]

    def _may_manage(self, uid: int, record: ModelRecord) -> bool:
        """Root, the model's owner, or the daemon's own user may attach to or change a model."""
        return uid in (0, record.owner_uid, os.geteuid())

    def _send_policy(self, record: ModelRecord) -> None:
        if record.client is None:
            return
        self._send(
            record.client,
            MsgType.POLICY,
            {
                "limit_pages": record.limit_pages,
                "min_pages": record.min_pages,
                "priority": record.priority,
                "target_pages": record.target_pages,
            },
        )

    def _grow(self, conn: Connection, msg: Message, channel: GrantChannel | None = None) -> None:
        now = time.monotonic()
        request = GrowRequest(
            conn=conn,
            req=msg["req"],
            remaining=msg["pages"],
            deadline=now + msg["wait_ms"] / 1000,
            seq=next(self._seq),
            started=now,
            channel=channel,
        )
        self.pending.append(request)
        if len(self.pending) == 1:
            # Nothing waits ahead of it: serve it now rather than after the rest of this pass
            # (reads of other sockets, the host tier's completions). Requests that arrive while
            # others wait are served by the loop, in the order of `_serve_pending`.
            self._serve_pending()

    def _channel(self, conn: Connection, msg: Message) -> None:
        """Take the engine's grant channel: a Unix SOCK_SEQPACKET socket whose peer is the engine itself."""
        if conn.channel is not None:
            raise ProtocolError("this client has a grant channel already")
        fd = os.dup(msg.fds[0])  # the received descriptor is closed after the handler
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise ProtocolError(f"CHANNEL must carry a socket: {exc.strerror}") from None
        try:
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
                raise ProtocolError("CHANNEL must carry a Unix SOCK_SEQPACKET socket")
            try:
                pid, uid, _ = protocol.peer_credentials(sock)
            except OSError as exc:
                raise ProtocolError(f"CHANNEL's socket has no peer: {exc.strerror}") from None
            # A socketpair's peer credentials are those of the process that made it.
            if (pid, uid) != (conn.pid, conn.uid):
                raise ProtocolError(f"CHANNEL's socket belongs to pid {pid}, not to this engine (pid {conn.pid})")
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        conn.channel = GrantChannel(sock, conn)
        self.selector.register(sock, selectors.EVENT_READ, ("channel", conn.channel))

    def _return(self, conn: Connection, msg: Message) -> None:
        self._take_back(conn, msg)
        self._pages_back(conn.model.name, msg["pages"], routine=True)

    def _take_back(self, conn: Connection, msg: Message) -> None:
        """The pages a RETURN or OFFLOAD names leave the client (each must be held, once)."""
        page_ids = msg["pages"]
        unknown = [p for p in page_ids if p not in conn.held]
        if unknown or len(set(page_ids)) != len(page_ids):
            raise ProtocolError(f"{msg.type.name} names pages this client does not hold: {unknown[:8] or 'duplicates'}")
        conn.held.difference_update(page_ids)
        conn.used_pages = min(conn.used_pages, len(conn.held))
        conn.model.asked = max(0, conn.model.asked - len(page_ids))

    def _usage(self, conn: Connection, msg: Message) -> None:
        conn.used_pages = min(msg["used_pages"], len(conn.held))
        self._status_dirty = True

    def _layout(self, conn: Connection, msg: Message) -> None:
        """The engine's KV layout: checked in full, kept for status and for tools that read pages."""
        try:
            layout = KVLayout.from_dict(msg["layout"])
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        if layout.page_size != self.config.page_size:
            raise ProtocolError(f"layout has {layout.page_size}-byte pages; this daemon's are {self.config.page_size}")
        conn.model.layout = layout.to_dict()
        self._status_dirty = True

    def _slept(self, conn: Connection, msg: Message) -> None:
        conn.model.slept_reported = True
        self._maybe_asleep(conn.model)

    def _maybe_asleep(self, record: ModelRecord) -> None:
        """DRAINING becomes ASLEEP once the engine said SLEPT and every offload copy is done."""
        if record.state == ModelState.DRAINING and record.slept_reported and record.copies_in_flight == 0:
            record.state = ModelState.ASLEEP
            self._status_dirty = True

    def _offload(self, conn: Connection, msg: Message) -> None:
        """Pages given back during an offloading sleep: save their contents, then recycle them."""
        record = conn.model
        if record.state != ModelState.DRAINING or not record.sleep_offload:
            raise ProtocolError(f"OFFLOAD while model {record.name} is not draining for an offloading sleep")
        page_ids = msg["pages"]
        if len(set(msg["offsets"])) != len(page_ids):
            raise ProtocolError("OFFLOAD names the same offset twice")
        self._take_back(conn, msg)
        # From here the copy job owns the pages: they go back to the pool when it is done.
        record.copies_in_flight += 1

        def saved(error: Exception | None) -> None:
            record.copies_in_flight -= 1
            self._pages_back(record.name, page_ids)
            if error is not None:
                record.offload_lost = True
                logger.error("model %s: saving %d pages failed: %s", record.name, len(page_ids), error)
            if record.client is not conn or record.state != ModelState.DRAINING:
                self.tier.discard(record.name)  # the engine left meanwhile: nobody will restore
            self._maybe_asleep(record)

        try:
            self.tier.save(record.name, [self.pool.address_of(p) for p in page_ids], msg["offsets"], saved)
        except (TierFullError, DeviceError) as exc:
            logger.error("model %s: cannot save %d pages, their contents are lost: %s", record.name, len(page_ids), exc)
            saved(exc)

    def _adopt(self, conn: Connection, msg: Message) -> None:
        """Pages a client held across a daemon restart: import them and give them new ids."""
        old_ids = msg["pages"]
        if len(old_ids) > conn.adopt_expected:
            raise ProtocolError(f"ADOPT of {len(old_ids)} pages, but HELLO announced {conn.adopt_expected} more")
        mapping = []
        for old_id, fd in zip(old_ids, msg.fds, strict=True):
            try:
                physical = self.device.import_page(fd, self.config.page_size)
            except DeviceError as exc:
                raise ProtocolError(f"page {old_id} cannot be adopted: {exc}") from exc
            try:
                page = self.pool.adopt(physical, conn.model.name, conn.client_id, conn.uid)
            except (DeviceError, RuntimeError) as exc:
                physical.close()
                raise ProtocolError(f"page {old_id} cannot be adopted: {exc}") from exc
            conn.held.add(page.id)
            mapping.append([old_id, page.id])
        conn.adopt_expected -= len(old_ids)
        self._send(conn, MsgType.ADOPTED, {"mapping": mapping, "done": conn.adopt_expected == 0})
        self._status_dirty = True
        logger.info("model %s: adopted %d pages", conn.model.name, len(mapping))

    # ---- control ----

    def _control(self, conn: Connection, msg: Message) -> None:
        op, name, value = msg["op"], msg["model"], msg["value"]
        try:
            data = self._control_op(conn, op, name, value)
        except ControlError as exc:
            body = {"req": msg["req"], "ok": False, "error": _clip(str(exc)), "code": exc.code, "data": None}
            self._send(conn, MsgType.REPLY, body)
            return
        # Publish before replying: once kvctl returns, `kvctl status` shows the change. (Control
        # requests are rare; the publish costs one pack of the slots.)
        self._status_dirty = True
        self._publish(force=True)
        self._send(conn, MsgType.REPLY, {"req": msg["req"], "ok": True, "error": None, "code": None, "data": data})

    def _control_op(self, conn: Connection, op: str, name: str | None, value: int | None) -> Any:
        if op == "status":
            return self.status_dict()
        if name is None:
            raise ControlError(f"{op} needs a model name")
        record = self.models.get(name)
        if op in ("set_limit", "set_min", "set_priority"):
            if value is None:
                raise ControlError(f"{op} needs a value")
            if record is None:
                record = self._new_record(name, conn.uid)
                if record is None:
                    raise ControlError(f"the daemon already tracks {MAX_SLOTS} models", "no_room")
        if record is None:
            raise ControlError(f"no model named {name!r} is known to this daemon", "unknown_model")
        if not self._may_manage(conn.uid, record):
            raise ControlError(
                f"not permitted: model {name!r} belongs to uid {record.owner_uid}, you are uid {conn.uid}",
                "not_permitted",
            )
        page = self.config.page_size
        if op == "set_limit":
            record.limit_pages = -1 if value < 0 else value // page
            self._send_policy(record)
            if 0 <= record.limit_pages < record.held:
                self._ask_back(record, record.held - record.limit_pages, reason="limit")
        elif op == "set_min":
            pages = -(-max(value, 0) // page)
            others = sum(r.min_pages for r in self.models.values() if r is not record)
            if others + pages > self.config.budget_pages:
                raise ControlError(
                    f"minimums would total {others + pages} pages, more than the budget's {self.config.budget_pages}",
                    "no_room",
                )
            record.min_pages = pages
            self._send_policy(record)
        elif op == "set_priority":
            if not -(2**31) <= value < 2**31:
                raise ControlError("priority must fit in 32 bits")
            record.priority = value
            self._send_policy(record)
        elif op == "sleep":
            self._sleep(record, offload=bool(value))
        elif op == "wake":
            self._wake_model(record)
        return {"model": name, "state": record.state.name.lower(), "waiting_for": record.waiting_for}

    def _sleep(self, record: ModelRecord, offload: bool) -> None:
        if record.client is None:
            raise ControlError(f"model {record.name!r} has no engine attached", "conflict")
        if record.state == ModelState.WAKING:
            raise ControlError(f"model {record.name!r} is waking; put it to sleep once it is awake", "conflict")
        if record.state != ModelState.AWAKE:
            return  # draining or asleep already
        if offload and record.held > self.tier.room_pages():
            raise ControlError(
                f"the host tier has room for {self.tier.room_pages()} pages, model {record.name!r} holds "
                f"{record.held}: sleep without --offload, or start kvmemd with a larger --host-tier",
                "no_room",
            )
        record.state = ModelState.DRAINING
        record.sleep_offload = offload
        record.slept_reported = False
        record.offload_lost = False
        record.sleeps += 1
        self.totals["sleeps"] += 1
        self._send(record.client, MsgType.SLEEP, {"offload": offload})

    def _wake_model(self, record: ModelRecord) -> None:
        if record.state == ModelState.DRAINING and record.sleep_offload:
            raise ControlError(
                f"model {record.name!r} is still saving its cache to the host tier; wake it once it is asleep",
                "conflict",
            )
        if record.state not in (ModelState.DRAINING, ModelState.ASLEEP):
            return  # awake or waking already
        record.wakes += 1
        self.totals["wakes"] += 1
        saved = self.tier.saved_pages(record.name)
        if record.client is None:
            self.tier.discard(record.name)
            record.state = ModelState.DETACHED
            return
        if not saved:
            record.state = ModelState.AWAKE
            self._send(record.client, MsgType.WAKE, {"restored": not record.offload_lost})
            self._send_policy(record)
            return
        if 0 <= record.limit_pages < saved:
            raise ControlError(
                f"model {record.name!r} saved {saved} pages, over its limit of {record.limit_pages}: raise the limit",
                "conflict",
            )
        record.state = ModelState.WAKING
        now = time.monotonic()
        record.waiting_for = ""  # set by _serve_pending if the pages are not there at once
        self.pending.append(GrowRequest(record.client, 0, saved, float("inf"), next(self._seq), now, restore=True))

    def _restored(self, r: GrowRequest, page_ids: list[int], offsets: list[int], error: Exception | None) -> None:
        """A batch of a wake's pages is filled from the tier: send it, and WAKE after the last."""
        conn, record = r.conn, r.conn.model
        record.copies_in_flight -= 1
        if conn.closed or error is not None:
            self._pages_back(record.name, page_ids)
            if error is not None:
                record.offload_lost = True
                logger.error("model %s: restoring %d pages failed: %s", record.name, len(page_ids), error)
        else:
            conn.held.update(page_ids)
            for start in range(0, len(page_ids), protocol.MAX_FDS_PER_MESSAGE):
                batch = page_ids[start : start + protocol.MAX_FDS_PER_MESSAGE]
                exported = [self.pool.export_fd(self.pool.pages[p]) for p in batch]
                body = {"pages": batch, "offsets": offsets[start : start + len(batch)]}
                self._send(
                    conn, MsgType.RESTORE, body, [fd for fd, _ in exported], close_fds=any(c for _, c in exported)
                )
        if r.remaining == 0 and record.copies_in_flight == 0 and not conn.closed:
            record.state = ModelState.AWAKE
            record.waiting_for = ""
            if record.offload_lost:  # some of the cache is gone: the engine must not trust any of it
                self.tier.discard(record.name)
            self._send(conn, MsgType.WAKE, {"restored": not record.offload_lost})
            self._send_policy(record)
        self._status_dirty = True

    # ---- arbitration ----

    def _serve_pending(self) -> None:
        if not self.pending:
            self.pool.set_demand({})
            return
        now = time.monotonic()

        def order(r: GrowRequest) -> tuple:
            record = r.conn.model
            return (record.held >= record.min_pages, -record.priority, r.seq)

        demand: dict[int, int] = {}
        still_waiting: list[GrowRequest] = []
        # What the pool can still provide without reclaiming, shared out in serving order.
        supply = self.pool.supply()
        for r in sorted(self.pending, key=order):
            if r.abandoned:  # dropped during this pass (a failed send): _drop handled its pages
                continue
            record = r.conn.model
            if not r.restore and record.state in (ModelState.DRAINING, ModelState.ASLEEP, ModelState.WAKING):
                self._deny(r, "asleep", f"model {record.name} is {record.state.name.lower()}")
                continue
            room = r.remaining if record.limit_pages < 0 else min(r.remaining, record.limit_pages - record.held)
            if room <= 0 and r.restore:  # the limit was lowered during the wake: wait for it to rise
                record.waiting_for = f"{r.remaining} pages: the limit of {record.limit_pages} pages leaves no room"
                still_waiting.append(r)
                continue
            if room <= 0:
                self._deny(r, "limit", f"model {record.name} holds {record.held} pages, its limit")
                continue
            pages = self.pool.take(record.name, r.conn.client_id, r.conn.uid, room)
            if pages:
                self._grant(r, pages)
                room -= len(pages)
            if r.remaining == 0 or r.abandoned:
                continue
            if r.restore:
                record.waiting_for = f"{r.remaining} more pages: {self._budget_detail()}"
            if room <= 0:
                self._deny(r, "limit", f"model {record.name} reached its limit of {record.limit_pages} pages")
                continue
            if now >= r.deadline:
                self._deny(r, "budget", f"no free page within the wait: {self._budget_detail()}")
                continue
            still_waiting.append(r)
            demand[r.conn.uid] = demand.get(r.conn.uid, 0) + room
            covered = min(room, supply)
            supply -= covered
            shortfall = room - covered
            if shortfall > r.reclaim_asked:
                r.reclaim_asked += self._reclaim_for(record, shortfall - r.reclaim_asked)
        self.pending = still_waiting
        self.pool.set_demand(demand)

    def _budget_detail(self) -> str:
        stats = self.pool.stats()
        return f"{stats.created} of {stats.budget_pages} pages exist, {stats.granted} granted"

    def _reclaim_for(self, requester: ModelRecord, pages: int) -> int:
        """Ask other models above their minimum for `pages` free pages; return how many were asked."""
        candidates = [
            r
            for r in self.models.values()
            if r is not requester and r.client is not None and r.state == ModelState.AWAKE and r.askable > 0
        ]
        candidates.sort(key=lambda r: (r.priority, -(r.held - r.client.used_pages)))
        asked = 0
        for record in candidates:  # first pass: pages the engines report idle
            if record.client is None:  # dropped by a failed send during this pass
                continue
            idle = min(record.held - record.client.used_pages - record.asked, record.askable)
            if idle > 0 and asked < pages:
                take = min(idle, pages - asked)
                self._ask_back(record, take, reason="pressure")
                asked += take
        for record in candidates:  # then pages that an engine could free by evicting cached blocks
            spare = record.askable
            if asked < pages and spare > 0 and record.client is not None:
                take = min(spare, pages - asked)
                self._ask_back(record, take, reason="pressure")
                asked += take
        return asked

    def _ask_back(self, record: ModelRecord, pages: int, reason: str) -> None:
        if record.client is None:
            return
        record.reclaims += 1
        record.asked += pages
        record.asked_until = time.monotonic() + RECLAIM_DEADLINE_MS / 1000
        self.totals["reclaims"] += 1
        self._send(
            record.client, MsgType.RECLAIM, {"pages": pages, "deadline_ms": RECLAIM_DEADLINE_MS, "reason": reason}
        )
        self._status_dirty = True

    def _grant(self, r: GrowRequest, pages: list[Page]) -> None:
        conn, record = r.conn, r.conn.model
        r.remaining -= len(pages)
        r.granted += len(pages)
        if r.restore:
            # The copy job owns the pages until they are filled; `_restored` sends them.
            page_ids = [p.id for p in pages]
            record.copies_in_flight += 1
            record.pages_granted_total += len(pages)
            self.tier.restore(
                record.name,
                [self.pool.address_of(p) for p in page_ids],
                lambda offsets, error: self._restored(r, page_ids, offsets, error),
            )
            return
        conn.held.update(p.id for p in pages)
        record.pages_granted_total += len(pages)
        batches = protocol.batched(pages)
        for i, batch in enumerate(batches):
            exported = [self.pool.export_fd(p) for p in batch]
            fds = [fd for fd, _ in exported]
            close_fds = any(must_close for _, must_close in exported)
            done = r.remaining == 0 and i == len(batches) - 1
            body = {"req": r.req, "pages": [p.id for p in batch], "done": done}
            self._send(conn, MsgType.GRANT, body, fds, close_fds=close_fds, channel=r.channel)
        if r.remaining == 0:
            record.grants += 1
            self.totals["grants"] += 1
            latency = time.monotonic() - r.started
            record.last_grant_us = int(latency * 1e6)
            if self.observe_grant_latency is not None:
                self.observe_grant_latency(latency)
        self._status_dirty = True

    def _deny(self, r: GrowRequest, reason: str, detail: str) -> None:
        record = r.conn.model
        record.denies += 1
        self.totals["denies"] += 1
        body = {"req": r.req, "reason": reason, "detail": _clip(detail), "granted": r.granted}
        self._send(r.conn, MsgType.DENY, body, channel=r.channel)
        self._status_dirty = True

    # ---- status ----

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        since = now - self._last_publish
        if not (force or (self._status_dirty and since >= STATUS_MIN_INTERVAL_S) or since >= HEARTBEAT_S):
            return
        stats = self.pool.stats()
        daemon = DaemonStatus(
            daemon_pid=os.getpid(),
            gpu=self.config.gpu,
            page_size=self.config.page_size,
            budget_pages=self.config.budget_pages,
            pages_created=stats.created,
            pages_free=stats.free_clean + stats.free_dirty,
            pages_free_clean=stats.free_clean,
            pages_granted=stats.granted,
            pages_quarantined=sum(len(ids) for _, ids in self.quarantine.values()),
            heartbeat_ns=time.monotonic_ns(),
            started_unix=self.started_unix,
            grants=self.totals["grants"],
            denies=self.totals["denies"],
            reclaims=self.totals["reclaims"],
            num_models=len(self.models),
            device_kind=self.device.kind,
            device_name=self.device.name,
            host_tier_used_bytes=self.tier.used_bytes,
            host_tier_capacity_bytes=self.tier.capacity,
            sleeps=self.totals["sleeps"],
            wakes=self.totals["wakes"],
        )
        slots: list[ModelStatus | None] = [None] * MAX_SLOTS
        for record in self.models.values():
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
                used_pages=client.used_pages if client else 0,
                target_pages=record.target_pages,
                grants=record.grants,
                denies=record.denies,
                reclaims=record.reclaims,
                pages_granted_total=record.pages_granted_total,
                pages_returned_total=record.pages_returned_total,
                last_grant_us=record.last_grant_us,
                saved_pages=self.tier.saved_pages(record.name),
                sleeps=record.sleeps,
                wakes=record.wakes,
            )
        self.status.publish(daemon, slots)
        self._status_dirty = False
        self._last_publish = now

    def status_dict(self) -> dict[str, Any]:
        stats = self.pool.stats()
        return {
            "daemon": {
                "pid": os.getpid(),
                "gpu": self.config.gpu,
                "device": self.device.kind,
                "page_size": self.config.page_size,
                "budget_pages": self.config.budget_pages,
                "pages_created": stats.created,
                "pages_free_clean": stats.free_clean,
                "pages_free_dirty": stats.free_dirty,
                "pages_granted": stats.granted,
                "pages_created_total": stats.pages_created_total,
                "pages_released_total": stats.pages_released_total,
                "pages_scrubbed_total": stats.pages_scrubbed_total,
                "out_of_memory_total": stats.out_of_memory_total,
                "host_tier_used_bytes": self.tier.used_bytes,
                "host_tier_capacity_bytes": self.tier.capacity,
                "host_tier_warm_bytes": self.tier.warm_bytes,
                "host_tier_saved_bytes_total": self.tier.bytes_saved_total,
                "host_tier_restored_bytes_total": self.tier.bytes_restored_total,
            },
            "models": [
                {
                    "model": r.name,
                    "state": r.state.name.lower(),
                    "pid": r.client.pid if r.client else 0,
                    "mapped_pages": r.held,
                    "limit_pages": r.limit_pages,
                    "min_pages": r.min_pages,
                    "priority": r.priority,
                    "saved_pages": self.tier.saved_pages(r.name),
                    "waiting_for": r.waiting_for,
                    "geometry": r.geometry,
                    "layout": r.layout,
                }
                for r in self.models.values()
            ],
        }


def _clip(text: str, limit: int = 1024) -> str:
    """Text cut to fit a protocol text field (messages may quote what a peer sent)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _has_exited(pidfd: int) -> bool:
    """Whether the process behind `pidfd` has terminated (a pidfd polls readable then)."""
    poller = selectors.DefaultSelector()
    try:
        poller.register(pidfd, selectors.EVENT_READ)
        return bool(poller.select(0))
    finally:
        poller.close()


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM and SIGINT stop the daemon cleanly; SIGPIPE is ignored (send errors are handled)."""

    def stop(signum: int, frame: object) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        daemon.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
