"""An engine's connection to kvmemd: the page source whose pages the daemon lends.

`DaemonClient` implements `kvmem.page_source.PageSource`: it asks for pages, imports the file
descriptors the daemon sends as `Page`s, gives pages back, reports usage, and hands the daemon's
requests (reclaim, policy, sleep, restore, wake) to its one `PageListener`. Mapping pages is the
caller's business: a page must be unmapped (after synchronizing the work that used it) before
`release`.

A reader thread receives every message on the connection. The listener runs on that thread: its
methods must be short and never call `acquire` (it would wait for the thread that runs it).

Grant channel. Right after the handshake the client opens a second socket to the daemon, a
`socketpair` whose other end it sends in a CHANNEL message, and `acquire` asks on it and reads the
answers (GRANT, DENY) itself, on the calling thread: a grant then costs one process wake-up, not
two (the reader thread's, then the caller's), and never queues behind other messages. One
`acquire` at a time uses the channel; one that finds it busy (another thread is acquiring) or gone
(reconnecting) asks over the connection and waits for the reader thread, as before.

When the daemon goes away, the client keeps its pages (they stay mapped and usable) and, if
`reconnect` is on, connects again as soon as a daemon answers, sends its pages back as
descriptors (ADOPT) and learns their new ids; `Page.id` is updated in place and `on_reconnect`
is called.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmem.common import protocol
from kvmem.common.errors import ConnectionClosed, DaemonRefusedError, DaemonUnavailableError, ProtocolError
from kvmem.common.protocol import MsgType, check_model_name
from kvmem.common.runtime import DaemonPaths
from kvmem.device import Device, DeviceError, open_device
from kvmem.device.cuda import gpu_uuid
from kvmem.page_source import Grant, Page, PageListener, Shortfall

logger = logging.getLogger(__name__)

DEFAULT_WAIT_S = 5.0
# The daemon answers a GROW by its deadline; beyond this margin the daemon counts as gone.
ANSWER_MARGIN_S = 10.0
RECONNECT_BACKOFF_S = (0.05, 1.0)


@dataclass(frozen=True)
class Policy:
    """What the daemon currently asks of this model, in pages (-1: none)."""

    limit_pages: int = -1
    min_pages: int = 0
    priority: int = 0
    target_pages: int = -1

    @property
    def cache_target(self) -> int:
        """What the cache should hold at most: the target while one is set, else the limit (-1: none)."""
        return self.target_pages if self.target_pages >= 0 else self.limit_pages


@dataclass
class _Waiter:
    pages: list[Page] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    shortfall: Shortfall | None = None


def _daemon_paths(runtime_dir: str | os.PathLike | None, gpu: int, uuid: str | None) -> DaemonPaths:
    """Where this process's GPU `gpu` has its daemon: by UUID when a GPU daemon serves it, else by
    ordinal (a host-memory daemon, or none: connecting then says so; a GPU daemon found there that
    serves another GPU is refused at WELCOME)."""
    if uuid is not None:
        try:
            return DaemonPaths.for_uuid(runtime_dir, uuid)
        except DaemonUnavailableError:
            pass  # no GPU daemon for it in this directory: see what the ordinal's socket holds
    return DaemonPaths.resolve(runtime_dir, gpu)


class DaemonClient:
    """An engine process's session with the daemon of one GPU.

    Args:
        model: The model's name (one engine per model per daemon).
        gpu: GPU ordinal, selecting the daemon.
        runtime_dir: The daemon's runtime directory (default: `kvmem.common.runtime.default_runtime_dir`).
        device: The device to import pages on (default: the kind the daemon reports).
        reconnect: Reconnect and re-register pages when the daemon restarts.
        listener: Where the daemon's requests go (or later through `listen`). A POLICY becomes
            ``listener.target(target pages, else the limit's)``; without a listener a SLEEP is
            answered SLEPT at once (nothing holds pages for the model yet).
        on_reconnect: ``f()``: reconnected after a daemon restart; page ids are updated.

    Raises:
        DaemonUnavailableError: No daemon answers.
        DaemonRefusedError: The daemon refused (e.g. the model is already attached).
    """

    def __init__(
        self,
        model: str,
        *,
        gpu: int = 0,
        runtime_dir: str | os.PathLike | None = None,
        device: Device | None = None,
        reconnect: bool = True,
        listener: PageListener | None = None,
        on_reconnect: Callable[[], None] | None = None,
    ):
        self.model = check_model_name(model)
        # This process's GPU `gpu` as CUDA_VISIBLE_DEVICES numbers it here, known to the daemons by its
        # UUID (None without a usable GPU: then only a host-memory daemon, found by ordinal, can serve).
        self.gpu, self.gpu_uuid = gpu, gpu_uuid(gpu)
        self.paths = _daemon_paths(runtime_dir, gpu, self.gpu_uuid)
        self.reconnect = reconnect
        self._listener = listener
        self.on_reconnect = on_reconnect
        self.policy = Policy()
        self.layout: dict[str, Any] | None = None  # the cache's layout descriptor, once described
        self.drains = False  # whether the engine declared a drain hook (`declare_drain_hook`)
        # Whether the engine sleeps: from its SLEPT until a WAKE. Sent in HELLO, so that a daemon
        # restarted meanwhile records it asleep (and `kvctl wake` reaches it) rather than awake.
        self.asleep = False
        # A sleep under way: from the daemon's SLEEP until the engine's SLEPT (or a WAKE that rolls it
        # back). HELLO says asleep then too: a daemon restarted during the drain records the model asleep
        # with nothing saved, and the drain finishes against it (`sleep_interrupted`).
        self.draining = False
        # The daemon this connection reached did not order the sleep under way (it restarted, or the
        # connection dropped, during the drain): what the drain offloads goes back as plain returns,
        # since that daemon saves nothing for it; the wake then says nothing was restored.
        self.sleep_interrupted = False
        self.pages: dict[int, Page] = {}  # by the daemon's current page id
        self.connected = threading.Event()
        self._lock = threading.RLock()  # guards pages, waiters and sending
        self._waiters: dict[int, _Waiter] = {}
        self._req_ids = itertools.count(1)
        self._closing = False
        # The grant channel (see the module docstring); whoever holds _channel_lock may use it.
        self._channel: socket.socket | None = None
        self._channel_lock = threading.Lock()
        self._channel_timeout: float | None = None
        self._sock = self.paths.connect()
        try:
            welcome = self._handshake(self._sock, adopt=0, page_size=0)
            if device is not None and device.kind != welcome["device_kind"]:
                raise DaemonRefusedError(f"daemon serves a {welcome['device_kind']} device, not {device.kind}")
            self._check_gpu(welcome)
            # The device in this process's numbering: the daemon's ordinal is its own.
            self.device = device or open_device(welcome["device_kind"], gpu)
        except BaseException:
            self._sock.close()
            raise
        self._channel = self._try_open_channel(self._sock)
        self._owns_device = device is None
        self.page_size: int = welcome["page_size"]
        self.budget_pages: int = welcome["budget_pages"]  # the daemon's whole budget, for sizing caches
        self.client_id: int = welcome["client_id"]
        self.slot: int = welcome["slot"]
        self.connected.set()
        self._reader = threading.Thread(target=self._read_loop, name=f"kvmem-client-{model}", daemon=True)
        self._reader.start()

    # ---- requests ----

    def listen(self, listener: PageListener) -> None:
        """Send the daemon's requests to `listener` from now on (the cache registers itself).

        What the daemon said before there was a listener is told to it first: the target of a limit
        set before the engine made its cache, and a sleep (the model was put to sleep, or stayed
        asleep across a restart, before the cache existed: the cache starts asleep).
        """
        with self._lock:  # a POLICY read meanwhile reaches the listener after this one, never before
            self._listener = listener
            if self.policy.cache_target >= 0:
                listener.target(self.policy.cache_target)
            if self.asleep:
                listener.sleep(False)

    def acquire(self, n: int, wait: float = DEFAULT_WAIT_S) -> Grant:
        """Ask for `n` pages, waiting up to `wait` seconds for the daemon to find them.

        Returns every page granted; its `shortfall` says why it is short (the daemon's DENY reason,
        or "disconnected"). Out of memory is an outcome, not an exception.
        """
        if n < 1:
            raise ValueError(f"acquire({n}): ask for at least one page")
        if not self.connected.is_set():
            return Grant([], Shortfall("disconnected", "kvmemd is not connected"))
        if self._channel_lock.acquire(blocking=False):
            try:
                if self._channel is not None:
                    return self._acquire_on_channel(self._channel, n, wait)
            finally:
                self._channel_lock.release()
        return self._acquire_via_reader(n, wait)

    def acquire_ready(self, n: int) -> Grant:
        """`acquire` with no wait: the daemon grants what is free for this model now (its own pages
        and the warm reserve), and no more (a DENY for the rest, which is no error here)."""
        return self.acquire(n, wait=0.0)

    def sure_pages(self) -> int:
        """None are sure: the daemon weighs every request against its other models when it comes."""
        return 0

    def _acquire_on_channel(self, channel: socket.socket, pages: int, wait: float) -> Grant:
        """`acquire` over the grant channel, answered on this thread (`_channel_lock` held)."""
        req = next(self._req_ids)
        timeout = wait + ANSWER_MARGIN_S
        deadline = time.monotonic() + timeout
        granted: list[Page] = []
        try:
            if timeout != self._channel_timeout:
                # A kernel receive timeout (SO_RCVTIMEO) rather than socket.settimeout, which
                # would add a poll() before every receive.
                seconds, micros = divmod(int(timeout * 1e6), 1_000_000)
                channel.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros))
                self._channel_timeout = timeout
            protocol.send_message(channel, MsgType.GROW, {"req": req, "pages": pages, "wait_ms": int(wait * 1000)})
            while True:
                msg = protocol.receive_message(channel)
                if msg.type not in (MsgType.GRANT, MsgType.DENY) or msg["req"] != req:
                    protocol.close_fds(msg.fds)
                    raise ProtocolError(f"kvmemd sent {msg.type.name} for request {msg.body.get('req')} on the channel")
                if msg.type == MsgType.DENY:
                    return Grant(granted, Shortfall(msg["reason"], msg["detail"]))
                granted.extend(self._import(msg))
                if msg["done"]:
                    return Grant(granted)
                if time.monotonic() > deadline:
                    raise TimeoutError("kvmemd did not finish the grant in time")
        except (ConnectionClosed, OSError, ProtocolError, DeviceError) as exc:
            # The daemon went away (the reader thread reconnects and opens a new channel), or it
            # is stuck or broken: this channel is done either way. A BlockingIOError here is the
            # receive timeout, TimeoutError the deadline, DeviceError a descriptor that does not
            # import. Pages granted so far are kept.
            reason = str(exc) or type(exc).__name__
            if not self._closing:
                logger.warning("kvmemd grant channel lost: %s", reason)
            self._channel = None
            channel.close()
            return Grant(granted, Shortfall("disconnected", f"the grant channel to kvmemd was lost: {reason}"))

    def _acquire_via_reader(self, pages: int, wait: float) -> Grant:
        """`acquire` over the connection: the reader thread collects the answer."""
        req = next(self._req_ids)
        waiter = _Waiter()
        with self._lock:
            self._waiters[req] = waiter
            try:
                self._send(MsgType.GROW, {"req": req, "pages": pages, "wait_ms": int(wait * 1000)})
            except OSError as exc:
                del self._waiters[req]
                return Grant([], Shortfall("disconnected", f"kvmemd is not connected: {exc}"))
        # The daemon answers by its deadline; the margin covers a daemon that died meanwhile.
        waiter.done.wait(wait + ANSWER_MARGIN_S)
        with self._lock:
            self._waiters.pop(req, None)
        if not waiter.done.is_set():
            return Grant(waiter.pages, Shortfall("disconnected", "no answer from kvmemd"))
        return Grant(waiter.pages, waiter.shortfall)

    def release(self, pages: list[Page]) -> None:
        """Give pages back. They must be unmapped, and no device work may touch them any more."""
        self._give_back(pages, None)

    def offload(self, pages: list[Page], offsets: list[int]) -> None:
        """Give pages back during an offloading sleep; the daemon keeps their contents for `offsets`.

        `offsets[i]` is where `pages[i]` was mapped (any integer the engine chooses, unique); on
        wake the daemon restores each page's bytes into a page handed back with that offset.
        The pages must be unmapped and no device work may touch them any more.
        """
        if len(offsets) != len(pages):
            raise ValueError(f"{len(pages)} pages but {len(offsets)} offsets")
        self._give_back(pages, offsets)

    def _give_back(self, pages: list[Page], offsets: list[int] | None) -> None:
        with self._lock:
            for page in pages:
                if self.pages.get(page.id) is not page:
                    raise ValueError(f"page {page.id} is not held by this client")
            for page in pages:
                del self.pages[page.id]
                page.physical.close()
            ids = [p.id for p in pages]
            if self.connected.is_set():
                try:
                    if offsets is None or self.sleep_interrupted:
                        for i in range(0, len(ids), protocol.MAX_RETURN_IDS):
                            self._send(MsgType.RETURN, {"pages": ids[i : i + protocol.MAX_RETURN_IDS]})
                    else:
                        for i in range(0, len(ids), protocol.MAX_OFFLOAD_IDS):
                            end = i + protocol.MAX_OFFLOAD_IDS
                            self._send(MsgType.OFFLOAD, {"pages": ids[i:end], "offsets": offsets[i:end]})
                except OSError:
                    pass  # the daemon is gone: it cannot account for them; nothing is lost here

    def describe(self, layout: dict[str, Any]) -> None:
        """Tell the daemon how this engine's KV cache is laid out (`KVLayout.to_dict()`); kept across reconnects."""
        self.layout = layout
        self._send_if_connected(MsgType.LAYOUT, {"layout": layout})

    def report_usage(self, used_pages: int) -> None:
        """Tell the daemon how many held pages hold live data (for reclaim choices and status)."""
        self._send_if_connected(MsgType.USAGE, {"used_pages": max(0, used_pages)})

    def slept(self) -> None:
        """Tell the daemon the engine has drained and returned its pages after a sleep request."""
        self.asleep = True
        self.draining = False
        # (After an interrupted sleep the daemon has the model asleep already; SLEPT changes nothing there.)
        self._send_if_connected(MsgType.SLEPT, {})

    def declare_drain_hook(self) -> None:
        """Tell the daemon the engine can drain for a sleep (it registered a hook); kept across reconnects."""
        self.drains = True
        self._send_if_connected(MsgType.DRAIN, {"hook": True})

    def close(self) -> None:
        """End the session. Pages still held are released here; their memory stays alive while mapped.

        The daemon takes them back once this process has exited (a live process may still map
        them). Return pages first for them to go back at once. Idempotent.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._replace_channel(None)  # after any acquire still using it (woken by the shutdown)
        with self._lock:
            for page in self.pages.values():
                page.physical.close()
            self.pages.clear()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already disconnected
        self._reader.join(timeout=10)
        self._sock.close()
        if self._owns_device:
            self.device.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ----

    def _send(self, msg_type: MsgType, body: dict[str, Any], fds: list[int] | None = None) -> None:
        with self._lock:
            protocol.send_message(self._sock, msg_type, body, fds or [])

    def _send_if_connected(self, msg_type: MsgType, body: dict[str, Any]) -> None:
        if self.connected.is_set():
            try:
                self._send(msg_type, body)
            except OSError:
                pass  # disconnected meanwhile: the reader thread reconnects

    def _check_gpu(self, welcome: protocol.Message) -> None:
        """A GPU daemon must serve this process's GPU `gpu`: the same UUID, whatever the ordinals."""
        served = welcome["device_uuid"]
        if welcome["device_kind"] == "cuda" and served != self.gpu_uuid:
            mine = f"is {self.gpu_uuid}" if self.gpu_uuid else "cannot be opened here"
            raise DaemonRefusedError(
                f"kvmemd at {self.paths.socket} serves GPU {served}, but this process's GPU {self.gpu} {mine} "
                "(CUDA_VISIBLE_DEVICES numbers GPUs per process): start kvmemd for this GPU, or connect to its daemon"
            )

    def _handshake(self, sock: socket.socket, adopt: int, page_size: int) -> protocol.Message:
        # Read once: the cache's thread may say SLEPT meanwhile (then it is asleep, and HELLO said so).
        draining = self.draining
        if draining:
            self.sleep_interrupted = True
        protocol.send_message(
            sock,
            MsgType.HELLO,
            {
                "version": protocol.PROTOCOL_VERSION,
                "role": "engine",
                "model": self.model,
                "asleep": self.asleep or draining,
                "adopt": adopt,
                "page_size": page_size,
            },
        )
        return protocol.receive_expected(sock, MsgType.WELCOME)

    def _open_channel(self, sock: socket.socket) -> socket.socket:
        """A new grant channel: one end of a socketpair, the other sent to the daemon over `sock`."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            with self._lock:
                protocol.send_message(sock, MsgType.CHANNEL, {}, [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    def _try_open_channel(self, sock: socket.socket) -> socket.socket | None:
        """`_open_channel`, or None (acquires then go over the connection) if it cannot be made."""
        try:
            return self._open_channel(sock)
        except OSError as exc:
            logger.warning("no grant channel to kvmemd (acquires go over the connection): %s", exc)
            return None

    def _replace_channel(self, channel: socket.socket | None) -> None:
        """Make `channel` the grant channel, closing the old one once no acquire uses it."""
        old = self._channel
        if old is not None:
            try:
                old.shutdown(socket.SHUT_RDWR)  # an acquire blocked on it wakes, gives it up
            except OSError:
                pass  # that acquire closed it already
        with self._channel_lock:
            if old is not None:
                old.close()
            self._channel = channel
            self._channel_timeout = None

    def _read_loop(self) -> None:
        while not self._closing:
            try:
                msg = protocol.receive_message(self._sock)
            except (ConnectionClosed, OSError, ProtocolError) as exc:
                if self._closing:
                    return
                logger.warning("kvmemd connection lost: %s", exc)
                self._disconnected()
                if not self.reconnect or not self._reconnect():
                    return
                continue
            try:
                self._dispatch(msg)
            except Exception:
                logger.exception("kvmem client: handling %s failed", msg.type.name)
            finally:
                protocol.close_fds(msg.fds)

    def _dispatch(self, msg: protocol.Message) -> None:
        if msg.type == MsgType.GRANT:
            self._granted(msg)
        elif msg.type == MsgType.DENY:
            with self._lock:
                waiter = self._waiters.get(msg["req"])
            if waiter is not None:
                waiter.shortfall = Shortfall(msg["reason"], msg["detail"])
                waiter.done.set()
        elif msg.type == MsgType.RECLAIM:
            if self._listener is not None:
                self._listener.reclaim(msg["pages"], msg["reason"])
        elif msg.type == MsgType.POLICY:
            with self._lock:  # see `listen`
                self.policy = policy = Policy(**msg.body)
                if self._listener is not None:
                    self._listener.target(policy.cache_target)
        elif msg.type == MsgType.SLEEP:
            self.draining, self.sleep_interrupted = True, False
            if self._listener is not None:
                self._listener.sleep(msg["offload"])
            else:
                self.slept()  # nothing here holds pages for a model the operator sleeps
        elif msg.type == MsgType.RESTORE:
            pages = self._import(msg)
            if self._listener is not None:
                self._listener.restore(pages, msg["offsets"])
        elif msg.type == MsgType.WAKE:
            self.asleep = self.draining = self.sleep_interrupted = False
            if self._listener is not None:
                self._listener.wake(msg["restored"])
        elif msg.type == MsgType.GOODBYE:
            logger.info("kvmemd says goodbye: %s", msg["reason"])
        elif msg.type == MsgType.ERROR:
            logger.error("kvmemd reports an error: %s", msg["message"])
        else:
            logger.warning("unexpected %s from kvmemd", msg.type.name)

    def _import(self, msg: protocol.Message) -> list[Page]:
        """Import the pages of a GRANT or RESTORE, taking over its descriptors; they are held from here on."""
        fds, msg.fds = msg.fds, []  # consumed by the import, closed by it even if it fails
        physicals = self.device.import_pages(fds, self.page_size, consume=True)
        imported = [Page(page_id, physical) for page_id, physical in zip(msg["pages"], physicals, strict=True)]
        with self._lock:
            for page in imported:
                self.pages[page.id] = page
        return imported

    def _granted(self, msg: protocol.Message) -> None:
        imported = self._import(msg)
        with self._lock:
            waiter = self._waiters.get(msg["req"])
        if waiter is None:  # the request gave up waiting: keep the pages, the caller can return them
            logger.warning("pages granted for an abandoned request %d are kept", msg["req"])
            return
        waiter.pages.extend(imported)
        if msg["done"]:
            waiter.done.set()

    def _disconnected(self) -> None:
        self.connected.clear()
        with self._lock:
            for waiter in self._waiters.values():
                waiter.shortfall = Shortfall("disconnected", "the connection to kvmemd was lost")
                waiter.done.set()

    def _reconnect(self) -> bool:
        """Connect again and re-register every held page; False if the client is closing."""
        backoff = RECONNECT_BACKOFF_S[0]
        failures = 0
        while not self._closing:
            sock = None
            try:
                sock = self.paths.connect()
                self._adopt_pages(sock)
            except (ConnectionError, OSError, ProtocolError) as exc:
                # A daemon that is stopping still accepts for a moment and then closes: say it once per
                # outage (then at debug), and back off the same way as when nothing listens.
                if not isinstance(exc, DaemonUnavailableError):
                    failures += 1
                    level = logging.WARNING if failures == 1 else logging.DEBUG
                    logger.log(level, "re-registering with kvmemd failed (retrying with back-off): %s", exc)
                if sock is not None:
                    sock.close()
                time.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_S[1])
                continue
            with self._lock:
                old, self._sock = self._sock, sock
            old.close()
            self._replace_channel(self._try_open_channel(sock))
            self.connected.set()
            if self.layout is not None:
                self.describe(self.layout)
            if self.drains:
                self.declare_drain_hook()
            logger.info("reconnected to kvmemd with %d pages", len(self.pages))
            if self.on_reconnect:
                self.on_reconnect()
            return True
        return False

    def _adopt_pages(self, sock: socket.socket) -> None:
        with self._lock:
            held = list(self.pages.values())
        welcome = self._handshake(sock, adopt=len(held), page_size=self.page_size)
        self._check_gpu(welcome)
        if held and welcome["page_size"] != self.page_size:
            raise DaemonRefusedError(f"daemon's pages are {welcome['page_size']} bytes, ours {self.page_size}")
        self.client_id, self.slot = welcome["client_id"], welcome["slot"]
        self.budget_pages = welcome["budget_pages"]  # a restarted daemon may have another budget
        by_old_id = {p.id: p for p in held}
        new_ids: dict[int, int] = {}
        for i in range(0, len(held), protocol.MAX_FDS_PER_MESSAGE):
            batch = held[i : i + protocol.MAX_FDS_PER_MESSAGE]
            exported = [p.physical.export() for p in batch]
            try:
                protocol.send_message(sock, MsgType.ADOPT, {"pages": [p.id for p in batch]}, [e.fd for e in exported])
            finally:
                for e in exported:
                    e.close()
            while True:  # POLICY (and perhaps SLEEP) may come before the answer
                reply = protocol.receive_message(sock)
                if reply.type == MsgType.ADOPTED:
                    break
                if reply.type == MsgType.ERROR:
                    raise DaemonRefusedError(f"kvmemd refused the pages: {reply['message']}")
                self._dispatch(reply)
            new_ids.update(dict(reply["mapping"]))
        with self._lock:
            self.pages = {}
            for old_id, page in by_old_id.items():
                page.id = new_ids[old_id]
                self.pages[page.id] = page
