"""The grant channel: GROW and its answers on a socket of the engine's own, against a real kvmemd.

The protocol side is driven by hand over real sockets (a raw engine connection, its socketpair, a
child process for a socket that belongs to someone else); the client side through `DaemonClient`,
whose grows use the channel unless another thread is using it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmem.client import DaemonClient
from kvmem.common import protocol
from kvmem.common.protocol import ConnectionClosed, MsgType
from tests.daemon_support import DaemonProcess, EngineProcess, RawEngine, wait_for

BUDGET_PAGES = 8  # "16MiB" of 2 MiB pages


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path / "rt", "host", "16MiB") as daemon:
        wait_for(lambda: daemon.status().daemon.pages_created == BUDGET_PAGES, what="the warm reserve")
        yield daemon


def mapped_pages(daemon: DaemonProcess, model: str) -> int | None:
    """What the status says `model` holds (None until the daemon has published the model)."""
    status = daemon.status().model(model)
    return None if status is None else status.mapped_pages


def grow(sock: socket.socket, req: int, pages: int, wait_ms: int = 0) -> None:
    protocol.send_message(sock, MsgType.GROW, {"req": req, "pages": pages, "wait_ms": wait_ms})


def test_the_answer_comes_on_the_socket_the_grow_came_on(daemon: DaemonProcess):
    """A GROW on the channel is answered on the channel, one on the connection on the connection; closing the
    channel ends only the channel: the connection still grows and the daemon counts every page granted."""
    engine = RawEngine(daemon, "raw")
    channel = engine.open_channel()
    try:
        grow(channel, req=1, pages=2)
        grant = engine.receive(channel)
        assert (grant.type, grant["req"], len(grant["pages"]), grant["done"]) == (MsgType.GRANT, 1, 2, True)
        grow(engine.sock, req=2, pages=3)
        grant = engine.receive()
        assert (grant.type, grant["req"], len(grant["pages"])) == (MsgType.GRANT, 2, 3)
        grow(channel, req=3, pages=BUDGET_PAGES)  # 5 held: never servable, so the budget says no at once
        deny = engine.receive(channel)
        assert (deny.type, deny["req"], deny["reason"], deny["granted"]) == (MsgType.DENY, 3, "budget", 0)
        grow(channel, req=4, pages=3)  # what does fit
        answer = engine.receive(channel)
        assert (answer.type, len(answer["pages"]), answer["done"]) == (MsgType.GRANT, 3, True)
        channel.close()
        wait_for(lambda: mapped_pages(daemon, "raw") == BUDGET_PAGES, what="8 pages held")
        protocol.send_message(engine.sock, MsgType.RETURN, {"pages": grant["pages"]})
        grow(engine.sock, req=5, pages=1)
        assert engine.receive()["req"] == 5  # the connection outlived its channel
        wait_for(lambda: mapped_pages(daemon, "raw") == BUDGET_PAGES - 2, what="6 pages held")
    finally:
        channel.close()
        engine.close()
    # This process still runs and may still map what it was given: quarantined until it exits.
    wait_for(lambda: daemon.status().daemon.pages_quarantined == BUDGET_PAGES - 2, what="6 pages quarantined")


def test_a_waiting_grow_whose_channel_closes_is_dropped_and_its_pages_stay_in_the_pool(daemon: DaemonProcess):
    """A GROW waiting for memory on a channel that then closes is forgotten: the pages freed later stay in the
    pool, not sent to a socket nobody reads, and the engine (still attached) can have all of them."""
    with EngineProcess(daemon.runtime_dir, "holder") as holder:
        assert holder.call("grow", BUDGET_PAGES)["granted"] == BUDGET_PAGES
        engine = RawEngine(daemon, "raw")
        channel = engine.open_channel()
        try:
            # The daemon reads this GROW (and queues it: no page is free) before it reads the close.
            grow(channel, req=1, pages=2, wait_ms=30_000)
            channel.close()
            assert len(holder.call("return", "all")["returned"]) == BUDGET_PAGES
            # The holder's pages are zeroed for "raw" one by one: the grant may come in several parts.
            grow(engine.sock, req=2, pages=BUDGET_PAGES, wait_ms=30_000)
            parts = [engine.receive()]
            while not parts[-1]["done"]:
                parts.append(engine.receive())
            assert {(m.type, m["req"]) for m in parts} == {(MsgType.GRANT, 2)}
            assert sum(len(m["pages"]) for m in parts) == BUDGET_PAGES
        finally:
            channel.close()
            engine.close()


CHILD_WITH_CHANNEL = """
import os, socket, sys
from kvmem.common import protocol
from kvmem.common.protocol import PROTOCOL_VERSION, MsgType
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.settimeout(10)
sock.connect(sys.argv[1])
hello = {"version": PROTOCOL_VERSION, "role": "engine", "model": "child", "asleep": False, "adopt": 0, "page_size": 0}
protocol.send_message(sock, MsgType.HELLO, hello)
protocol.send_message(sock, MsgType.CHANNEL, {}, [int(sys.argv[2])])  # a socket its parent made
types = []
try:
    while True:
        msg = protocol.receive_message(sock)
        types.append(msg.type.name + ("" if msg.type != MsgType.ERROR else ": " + msg["message"]))
except protocol.ConnectionClosed:
    print(os.getpid())
    print(types)
"""


def test_a_channel_must_be_the_engines_own_seqpacket_socket(daemon: DaemonProcess):
    """CHANNEL is refused (ERROR, connection closed) when its descriptor is not a socket, is a stream socket,
    or is a socket another process made; and a second CHANNEL is refused. The daemon serves on."""
    engine = RawEngine(daemon, "not-a-socket")
    page = os.memfd_create("not-a-socket", os.MFD_CLOEXEC)
    try:
        protocol.send_message(engine.sock, MsgType.CHANNEL, {}, [page])
        assert engine.refusal().startswith("CHANNEL must carry a socket")
    finally:
        os.close(page)
        engine.close()

    engine = RawEngine(daemon, "stream")
    stream = engine.open_channel(socket.SOCK_STREAM)
    assert engine.refusal() == "CHANNEL must carry a Unix SOCK_SEQPACKET socket"
    stream.close()
    engine.close()

    engine = RawEngine(daemon, "twice")
    first = engine.open_channel()
    second = engine.open_channel()
    assert engine.refusal() == "this client has a grant channel already"
    with pytest.raises(ConnectionClosed):
        protocol.receive_message(first)  # the connection's end took its channel with it
    for sock in (first, second):
        sock.close()
    engine.close()

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with ours, theirs:
        child = subprocess.run(
            [sys.executable, "-c", CHILD_WITH_CHANNEL, str(daemon.paths.socket), str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert child.returncode == 0, child.stderr
    child_pid, types = child.stdout.splitlines()
    assert types == (
        f"['WELCOME', 'POLICY', \"ERROR: CHANNEL's socket belongs to pid {os.getpid()}, "
        f'not to this engine (pid {child_pid})"]'
    )
    assert daemon.proc.poll() is None


def test_only_grow_may_be_sent_on_a_channel(daemon: DaemonProcess):
    """Anything but GROW on the channel is a protocol error: an ERROR on the connection, which closes."""
    engine = RawEngine(daemon, "chatty")
    channel = engine.open_channel()
    try:
        grow(channel, req=1, pages=1)
        ids = engine.receive(channel)["pages"]
        protocol.send_message(channel, MsgType.RETURN, {"pages": ids})
        assert engine.refusal() == "RETURN on a grant channel, which carries only GROW"
    finally:
        channel.close()
        engine.close()
    wait_for(lambda: daemon.status().daemon.pages_quarantined == 1, what="the page quarantined with its process alive")


def test_a_grow_busy_on_the_channel_leaves_other_threads_served(daemon: DaemonProcess):
    """While one thread's grow waits on the channel for memory, another thread's grow goes over the
    connection and is answered at once; the waiting one is served when memory comes back."""
    with (
        EngineProcess(daemon.runtime_dir, "holder") as holder,
        DaemonClient("two-threads", runtime_dir=daemon.runtime_dir) as client,
    ):
        assert holder.call("grow", BUDGET_PAGES)["granted"] == BUDGET_PAGES
        results = {}
        waiting = threading.Thread(target=lambda: results.setdefault("waiting", client.acquire(3, wait=60)))
        waiting.start()
        wait_for(lambda: client._channel_lock.locked(), what="the waiting grow to hold the channel")
        quick = client.acquire(1, wait=0)
        assert (quick.pages, quick.shortfall.reason) == ([], "budget")
        assert waiting.is_alive()
        holder.call("return", 3)
        waiting.join(timeout=30)
        got = results["waiting"]
        assert (len(got.pages), got.shortfall) == (3, None)
        assert sorted(client.pages) == sorted(p.id for p in got.pages)
        client.release(got.pages)


def test_a_return_waiting_on_the_connection_is_handled_before_the_grow_on_the_channel(daemon: DaemonProcess):
    """A RETURN of the whole budget and the next GROW reach a stopped daemon together, the GROW ready
    first (sent first): the daemon reads the connection before it decides the GROW, so the pages just
    given back are granted again instead of the GROW being refused for a budget the engine seems to hold."""
    engine = RawEngine(daemon, "order")
    channel = engine.open_channel()
    grow(channel, 1, BUDGET_PAGES)
    granted = engine.receive(channel)
    assert granted.type == MsgType.GRANT and len(granted["pages"]) == BUDGET_PAGES and granted["done"]
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        grow(channel, 2, BUDGET_PAGES)  # no wait: decided at once, against what the engine holds then
        protocol.send_message(engine.sock, MsgType.RETURN, {"pages": granted["pages"]})
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    answer = engine.receive(channel)
    assert (answer.type, answer["req"], len(answer["pages"])) == (MsgType.GRANT, 2, BUDGET_PAGES)
    engine.close()
