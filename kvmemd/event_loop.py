"""The daemon's transport: one poller over sockets, pidfds and a wake pipe; outboxes; liveness.

Design note
-----------
One thread polls the listening socket, every client socket, every grant channel, a wake pipe
(written by the page pool's worker, the host tier and signals) and a pidfd per engine process.
All accounting lives on this thread; the pool's worker only creates, zeroes and releases pages.

The poller is the native grant lane (`kvmemd._grant_lane.GrantLane`, an epoll set with the same
read/write events as `selectors`): while `kvmemd.lane` has armed an engine, the lane serves that
engine's GROWs from its credit and takes its RETURNs of lane-granted pages inside `poll`, without
running Python. A frame the lane read and did not serve is handed over whole (`take_frame`) and
handled here first, before anything else is read from that socket, so messages keep their order.
`served` is called after every poll (the lane's counts into the daemon's records) and `disarm`
before an engine's connection or channel ends or it is sent a message that changes what it may
hold, so that the lane never serves an engine on a stale view.

Engines and kvctl connect to one ``SOCK_SEQPACKET`` socket and speak `kvmem.common.protocol`. Who is
calling comes from ``SO_PEERCRED`` (pid, uid), never from the message.

Contract with the daemon: `EventLoop` decodes frames and hands each message to `handle` (with
the grant channel it came on, if any); a `ProtocolError` raised there costs only that
connection (ERROR, then closed). Sending never blocks: a message goes to the endpoint's outbox
and is flushed as the socket takes it (EVENT_WRITE while it is full); descriptors marked so are
closed once sent, or when the endpoint closes unsent.

Liveness. A socket that closes, or an engine process whose pidfd becomes readable, ends the
client (`client_ended` is told first). Its pages go back to the pool (`pages_back`; dirty, so they
are zeroed before another model gets them) only once its process is gone: a process that closed
its socket but still runs may still map them, so they stay quarantined until its pidfd says it
exited.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import selectors
import socket
from collections.abc import Callable
from typing import Any

from kvmem.common import protocol
from kvmem.common.errors import ProtocolError
from kvmem.common.protocol import Message, MsgType
from kvmemd._grant_lane import GrantLane
from kvmemd.records import Connection, GrantChannel

logger = logging.getLogger(__name__)

# A client may have this many frames read in one turn, so that one chatty client cannot starve the others.
READS_PER_TURN = 64
# Once the lane has served something during a poll, it returns within this many seconds, so that the
# daemon's records and status follow the lane's grants (the status is published at most every 5 ms).
LANE_TURN_S = 0.005
# The messages after which an engine may hold less than before (a target, an ask, a sleep, a wake, the
# end): the lane stops serving it first (`disarm`).
_DISARMING = frozenset({MsgType.POLICY, MsgType.RECLAIM, MsgType.SLEEP, MsgType.WAKE, MsgType.GOODBYE})


class EventLoop:
    """Connections and their sockets, the selector, the wake pipe and the quarantine.

    Args:
        listener: The bound, listening, non-blocking daemon socket.
        handle: Called with each decoded message, the connection, and the grant channel it came on (or None).
        client_ended: Called once when a connection ends, before its pages are dealt with.
        channel_ended: Called once when a grant channel ends.
        pages_back: Called with (model name, page ids) when a gone client's pages may return to the pool.
        served: Called after every poll, before its events are handled (the lane's counts, `kvmemd.lane`).
        disarm: Called with an engine connection before the lane may no longer serve it (see above).
    """

    def __init__(
        self,
        listener: socket.socket,
        handle: Callable[[Connection, Message, GrantChannel | None], None],
        client_ended: Callable[[Connection], None],
        channel_ended: Callable[[GrantChannel], None],
        pages_back: Callable[[str, list[int]], None],
        served: Callable[[], None],
        disarm: Callable[[Connection], None],
    ):
        self.listener = listener
        self._handle = handle
        self._client_ended = client_ended
        self._channel_ended = channel_ended
        self._pages_back = pages_back
        self._served = served
        self._disarm = disarm
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.lane = GrantLane(protocol.PROTOCOL_VERSION)
        self._watched: dict[int, tuple[str, Any]] = {}  # fd -> (kind, its connection, channel or None)
        self._watch(listener.fileno(), selectors.EVENT_READ, "listen", None)
        self._watch(self._wake_r, selectors.EVENT_READ, "wake", None)
        self.connections: dict[int, Connection] = {}  # by client id
        self.quarantine: dict[int, tuple[str, list[int]]] = {}  # pidfd -> (model, page ids)
        self._client_ids = itertools.count(1)

    @property
    def wake_fd(self) -> int:
        """The wake pipe's write end (non-blocking): one byte written there ends the current or next `poll`."""
        return self._wake_w

    def wake(self) -> None:
        """Make the current or next `poll` return at once (safe from any thread and from signal handlers)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the loop is going to wake anyway

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for events (the lane serving armed engines meanwhile) and handle them all."""
        events = self.lane.poll(timeout, LANE_TURN_S)
        self._served()
        for fd, mask in events:
            watched = self._watched.get(fd)
            if watched is None:  # unregistered while handling an earlier event of this poll
                continue
            kind, obj = watched
            if kind == "listen":
                self._accept()
            elif kind == "wake":
                self._drain_wake()
            elif kind == "conn":
                if mask & selectors.EVENT_WRITE:
                    self.flush(obj)
                if mask & selectors.EVENT_READ and not obj.closed:
                    self._read(obj)
            elif kind == "channel":
                if mask & selectors.EVENT_WRITE:
                    self.flush(obj)
                if mask & selectors.EVENT_READ and not obj.closed:
                    self._read(obj.owner, obj)
            elif kind == "pidfd":
                self._process_exited(fd, obj)

    def _watch(self, fd: int, events: int, kind: str, obj: Any) -> None:
        self.lane.register(fd, events)
        self._watched[fd] = (kind, obj)

    def _unwatch(self, fd: int) -> None:
        self.lane.unregister(fd)
        del self._watched[fd]

    def close(self) -> None:
        """Release the quarantine's pidfds, the poller and the wake pipe (connections are dropped first)."""
        for pidfd in list(self.quarantine):
            self._unwatch(pidfd)
            os.close(pidfd)
        self.quarantine.clear()
        self.lane.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def quarantined_pages(self) -> int:
        return sum(len(ids) for _, ids in self.quarantine.values())

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass  # drained

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
            self._watch(sock.fileno(), selectors.EVENT_READ, "conn", conn)
            logger.debug("client %d connected: pid %d uid %d", conn.client_id, pid, uid)

    def watch_process(self, conn: Connection) -> None:
        """Watch `conn`'s process with a pidfd: its exit ends the client even if its socket stays open."""
        try:
            conn.pidfd = os.pidfd_open(conn.pid)
            self._watch(conn.pidfd, selectors.EVENT_READ, "pidfd", conn)
        except OSError:
            conn.pidfd = None  # already gone: EOF will follow

    def add_channel(self, conn: Connection, sock: socket.socket) -> None:
        """Make `sock` (checked by the caller) `conn`'s grant channel and watch it."""
        conn.channel = GrantChannel(sock, conn)
        self._watch(sock.fileno(), selectors.EVENT_READ, "channel", conn.channel)

    def _read(self, conn: Connection, channel: GrantChannel | None = None) -> None:
        """Handle what `conn` sent, on its connection or on its grant `channel`."""
        sock = conn.sock if channel is None else channel.sock
        kept = self.lane.take_frame(sock.fileno())  # read by the lane and not served: it comes first
        for _ in range(READS_PER_TURN):
            try:
                if kept is not None:
                    frame, fds = protocol.check_received(*kept)
                    kept = None
                else:
                    frame, fds = protocol.receive_frame(sock)
            except BlockingIOError:
                return
            except (protocol.ConnectionClosed, OSError) as exc:
                closed = isinstance(exc, protocol.ConnectionClosed)
                reason = "closed the connection" if closed else f"socket error: {exc}"
                if channel is None:
                    self.drop(conn, reason=reason)
                else:
                    self.drop_channel(channel, reason=reason)
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
            if channel is not None:
                # An engine returns pages on its connection and asks again on its channel, and epoll
                # lists the two sockets in no set order: what the connection holds (a RETURN sent before
                # this GROW) is handled first, or the GROW would be weighed against pages already given
                # back (and refused for a budget the engine no longer holds).
                self._read(conn)
                if conn.closed or channel.closed:
                    protocol.close_fds(msg.fds)
                    return
            try:
                self._handle(conn, msg, channel)
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
        self.send(conn, MsgType.ERROR, {"message": clip(message)})
        self.drop(conn, reason=f"protocol error: {message}")

    def send(
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
        if channel is None and conn.armed and msg_type in _DISARMING:
            self._disarm(conn)
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
            self.drop(conn, reason=f"internal error building {msg_type.name}")
            return
        endpoint.outbox.append((frame, fds, close_fds))
        if len(endpoint.outbox) == 1:
            self.flush(endpoint)

    def flush(self, endpoint: Connection | GrantChannel) -> None:
        """Send what `endpoint` has queued, until the socket is full (then wait for EVENT_WRITE)."""
        while endpoint.outbox and not endpoint.closed:
            frame, fds, close_fds = endpoint.outbox[0]
            try:
                endpoint.sock.sendmsg([frame], protocol.ancillary_for(fds))
            except BlockingIOError:
                if not endpoint.writing:
                    endpoint.writing = True
                    self.lane.modify(endpoint.sock.fileno(), selectors.EVENT_READ | selectors.EVENT_WRITE)
                return
            except OSError as exc:
                if isinstance(endpoint, GrantChannel):
                    self.drop_channel(endpoint, reason=f"send failed: {exc}")
                else:
                    self.drop(endpoint, reason=f"send failed: {exc}")
                return
            endpoint.outbox.popleft()
            if close_fds:
                protocol.close_fds(fds)
        if endpoint.writing and not endpoint.closed:
            endpoint.writing = False
            self.lane.modify(endpoint.sock.fileno(), selectors.EVENT_READ)

    def drop(self, conn: Connection, reason: str, keep_pages: bool = False) -> None:
        """End a client. Its pages return to the pool once its process is gone (never with `keep_pages`)."""
        if conn.closed:
            return
        if conn.armed:
            self._disarm(conn)  # what the lane granted joins `held` before the pages are dealt with
        conn.closed = True
        logger.info("client %d (pid %d, %s) ends: %s", conn.client_id, conn.pid, conn.role, reason)
        if conn.channel is not None:
            self.drop_channel(conn.channel, reason="its connection ended")
        self._close_socket(conn)
        del self.connections[conn.client_id]
        if conn.pidfd is not None:
            self._unwatch(conn.pidfd)
        self._client_ended(conn)
        held = sorted(conn.held)
        conn.held.clear()
        if keep_pages or not held:
            if conn.pidfd is not None:
                os.close(conn.pidfd)
            return
        model_name = conn.model.name if conn.model else ""
        if conn.pidfd is None or _has_exited(conn.pidfd):
            if conn.pidfd is not None:
                os.close(conn.pidfd)
            self._pages_back(model_name, held)
        else:
            # The process still runs and may still map these pages: hold them until it exits.
            logger.warning("pid %d closed its socket holding %d pages: quarantined until it exits", conn.pid, len(held))
            self.quarantine[conn.pidfd] = (model_name, held)
            self._watch(conn.pidfd, selectors.EVENT_READ, "pidfd", None)

    def drop_channel(self, channel: GrantChannel, reason: str) -> None:
        """End a grant channel (its waiting requests are abandoned); its engine stays attached."""
        if channel.closed:
            return
        conn = channel.owner
        if conn.armed:
            self._disarm(conn)
        channel.closed = True
        logger.debug("client %d: grant channel ends: %s", conn.client_id, reason)
        self._close_socket(channel)
        conn.channel = None
        self._channel_ended(channel)

    def _close_socket(self, endpoint: Connection | GrantChannel) -> None:
        """Stop watching and close `endpoint`'s socket; descriptors it had yet to send are closed."""
        self._unwatch(endpoint.sock.fileno())
        endpoint.sock.close()
        for _, fds, close_fds in endpoint.outbox:
            if close_fds:
                protocol.close_fds(fds)
        endpoint.outbox.clear()

    def _process_exited(self, pidfd: int, conn: Connection | None) -> None:
        if conn is not None:  # an engine process died with its socket still open somewhere
            self.drop(conn, reason="process exited")
            return
        model_name, held = self.quarantine.pop(pidfd)
        self._unwatch(pidfd)
        os.close(pidfd)
        self._pages_back(model_name, held)


def clip(text: str, limit: int = 1024) -> str:
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
