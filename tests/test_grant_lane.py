"""The native grant lane (kvmemd/_grant_lane.c, kvmemd/lane.py): real sockets, real descriptors.

The first tests drive `GrantLane` directly, as the daemon's loop does: socketpairs stand for an
engine's connection and grant channel, memfds for pages (each holding its id, so that a received
descriptor can be told apart). The last ones run a real kvmemd and check that what the lane serves
is counted, bounded by the model's limit and handed back when another model needs the pages.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmem.client import DaemonClient
from kvmem.common import protocol
from kvmem.common.protocol import MsgType
from kvmem.control import ControlClient
from kvmemd._grant_lane import GrantLane
from tests.daemon_support import DaemonProcess, EngineProcess, RawEngine, wait_for

MiB = 1 << 20
PAGE = 2 * MiB
READ, WRITE = 1, 2
CLIENT = 7


class Engine:
    """An engine's connection and grant channel: the daemon's ends registered with `lane`."""

    def __init__(self, lane: GrantLane):
        self.conn, self.conn_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel, self.channel_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (self.conn, self.channel):
            sock.setblocking(False)
            lane.register(sock.fileno(), READ)
        self.channel_peer.settimeout(5)

    def grow(self, req: int, pages: int) -> bytes:
        frame = protocol.encode(MsgType.GROW, {"req": req, "pages": pages, "wait_ms": 100})
        self.channel_peer.send(frame)
        return frame

    def give_back(self, page_ids: list[int]) -> bytes:
        frame = protocol.encode(MsgType.RETURN, {"pages": page_ids})
        self.conn_peer.send(frame)
        return frame

    def granted(self) -> tuple[int, list[int], list[int]]:
        """The next GRANT: its request, its page ids, and the id each received descriptor holds."""
        msg = protocol.receive_message(self.channel_peer)
        assert msg.type == MsgType.GRANT and msg["done"] is True
        contents = [struct.unpack("I", os.pread(fd, 4, 0))[0] for fd in msg.fds]
        protocol.close_fds(msg.fds)
        return msg["req"], msg["pages"], contents

    def close(self) -> None:
        for sock in (self.conn, self.conn_peer, self.channel, self.channel_peer):
            sock.close()


@pytest.fixture
def lane():
    lane = GrantLane(protocol.PROTOCOL_VERSION)
    yield lane
    lane.close()


@pytest.fixture
def pages():
    """Page id -> a memfd holding that id (the daemon's pool keeps one exported descriptor per page)."""
    fds = {}
    for page_id in range(10, 20):
        fd = os.memfd_create(f"page{page_id}")
        os.write(fd, struct.pack("I", page_id))
        fds[page_id] = fd
    yield fds
    protocol.close_fds(list(fds.values()))


@pytest.fixture
def engine(lane: GrantLane):
    engine = Engine(lane)
    yield engine
    try:
        lane.disarm(CLIENT)
    except KeyError:
        pass  # disarmed by the test, or never armed
    for sock in (engine.conn, engine.channel):
        lane.unregister(sock.fileno())
    engine.close()


def arm(lane: GrantLane, engine: Engine, pages: dict[int, int], credit: list[int], held=0, max_held=100, cap=None):
    lane.arm(
        CLIENT,
        engine.conn.fileno(),
        engine.channel.fileno(),
        held,
        max_held,
        cap if cap is not None else len(credit),
        [(page_id, pages[page_id]) for page_id in credit],
    )


def test_an_armed_engine_is_granted_its_credit_and_its_return_is_credit_again(lane, engine, pages):
    arm(lane, engine, pages, [10, 11, 12])
    assert lane.credit == 3
    engine.grow(1, 2)
    assert lane.poll(1.0, 0.0) == []  # served inside the poll: nothing for Python
    assert engine.granted() == (1, [11, 12], [11, 12])  # the last credit pages first, with their own descriptors
    assert lane.credit == 1
    assert lane.take_counters() == [(CLIENT, 2, 1, 2, 0, [])]
    engine.give_back([12, 11])
    assert lane.poll(1.0, 0.0) == []
    assert lane.credit == 3
    assert lane.take_counters() == [(CLIENT, 0, 0, 0, 2, [])]
    assert lane.take_counters() == []  # nothing served since
    engine.grow(2, 3)
    assert lane.poll(1.0, 0.0) == []
    assert engine.granted() == (2, [10, 12, 11], [10, 12, 11])
    counters, credit, held = lane.disarm(CLIENT)
    assert counters == (CLIENT, 3, 1, 3, 0, []) and credit == [] and held == [10, 11, 12]
    assert lane.credit == 0


def test_what_the_lane_does_not_serve_reaches_python_whole_and_changes_nothing(lane, engine, pages):
    arm(lane, engine, pages, [10, 11, 12])
    too_many = engine.grow(1, 4)  # more than the credit
    assert lane.poll(1.0, 0.0) == [(engine.channel.fileno(), READ)]
    assert lane.take_frame(engine.channel.fileno()) == (too_many, [], 0)
    assert lane.take_frame(engine.channel.fileno()) is None
    assert lane.credit == 3
    not_granted = engine.give_back([10])  # credit, not lane-granted: the daemon's books decide
    assert lane.poll(1.0, 0.0) == [(engine.conn.fileno(), READ)]
    assert lane.take_frame(engine.conn.fileno())[0] == not_granted
    engine.grow(2, 1)
    assert lane.poll(1.0, 0.0) == []
    assert engine.granted()[1] == [12]
    twice = engine.give_back([12, 12])
    assert lane.poll(1.0, 0.0) == [(engine.conn.fileno(), READ)]
    assert lane.take_frame(engine.conn.fileno())[0] == twice
    usage = protocol.encode(MsgType.USAGE, {"used_pages": 1})
    engine.conn_peer.send(usage)
    assert lane.poll(1.0, 0.0) == [(engine.conn.fileno(), READ)]
    assert lane.take_frame(engine.conn.fileno())[0] == usage
    engine.give_back([12])  # page 12 is still lane-granted after the refused RETURN
    assert lane.poll(1.0, 0.0) == []
    assert lane.credit == 3
    assert lane.take_counters() == [(CLIENT, 0, 1, 1, 1, [])]


def test_a_frame_with_descriptors_is_kept_with_them(lane, engine, pages):
    arm(lane, engine, pages, [10])
    frame = protocol.encode(MsgType.ADOPT, {"pages": [1]})
    spare = os.memfd_create("spare")
    try:
        engine.conn_peer.sendmsg([frame], protocol.ancillary_for([spare]))
    finally:
        os.close(spare)
    assert lane.poll(1.0, 0.0) == [(engine.conn.fileno(), READ)]
    data, fds, flags = lane.take_frame(engine.conn.fileno())
    assert data == frame and len(fds) == 1 and flags == 0
    assert os.fstat(fds[0]).st_size == 0  # the memfd itself, now the caller's
    protocol.close_fds(fds)


def test_the_limit_bounds_what_the_lane_grants(lane, engine, pages):
    arm(lane, engine, pages, [10, 11, 12], held=5, max_held=6)
    engine.grow(1, 2)  # 5 + 2 > 6
    assert lane.poll(1.0, 0.0) == [(engine.channel.fileno(), READ)]
    assert lane.take_frame(engine.channel.fileno()) is not None
    engine.grow(2, 1)
    assert lane.poll(1.0, 0.0) == []
    assert engine.granted()[1] == [12]


def test_a_return_waiting_on_the_connection_is_taken_before_a_grow_it_makes_room_for(lane, engine, pages):
    """The grow is listed first by epoll (it was sent first), the return it needs waits on the other socket."""
    arm(lane, engine, pages, [10], cap=2)
    engine.grow(1, 1)
    assert lane.poll(1.0, 0.0) == []
    assert engine.granted()[1] == [10]
    engine.grow(2, 1)
    engine.give_back([10])
    assert lane.poll(1.0, 0.0) == []
    assert engine.granted() == (2, [10], [10])
    assert lane.take_counters() == [(CLIENT, 1, 2, 2, 1, [])]


def test_poll_reports_other_descriptors_as_selectors_does(lane):
    r, w = os.pipe()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        lane.register(r, READ)
        lane.register(a.fileno(), READ)
        assert lane.poll(0.0, 0.0) == []
        os.write(w, b"x")
        assert lane.poll(1.0, 0.0) == [(r, READ)]
        lane.modify(a.fileno(), READ | WRITE)
        assert sorted(lane.poll(1.0, 0.0)) == sorted([(r, READ), (a.fileno(), WRITE)])
        lane.unregister(r)
        b.close()  # the peer's end: the socket reads end of file
        assert lane.poll(1.0, 0.0) == [(a.fileno(), READ | WRITE)]
        with pytest.raises(KeyError, match="already registered"):
            lane.register(a.fileno(), READ)
        with pytest.raises(KeyError, match="not registered"):
            lane.unregister(r)
        with pytest.raises(ValueError, match="events"):
            lane.modify(a.fileno(), 4)
        lane.unregister(a.fileno())
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


def test_arming_checks_its_arguments(lane, engine, pages):
    with pytest.raises(ValueError, match="registered, apart and unarmed"):
        lane.arm(CLIENT, engine.conn.fileno(), engine.conn.fileno(), 0, 10, 1, [])
    with pytest.raises(ValueError, match="do not fit"):
        arm(lane, engine, pages, [10, 11], cap=1)
    with pytest.raises(ValueError, match="named twice"):
        arm(lane, engine, pages, [10, 10])
    arm(lane, engine, pages, [10])
    with pytest.raises(RuntimeError, match="armed already"):
        arm(lane, engine, pages, [11])
    with pytest.raises(RuntimeError, match="disarm it first"):
        lane.unregister(engine.conn.fileno())
    assert lane.disarm(CLIENT)[1] == [10]
    with pytest.raises(KeyError, match="not armed"):
        lane.disarm(CLIENT)


def test_close_is_idempotent_and_refuses_further_use():
    lane = GrantLane(protocol.PROTOCOL_VERSION)
    lane.close()
    lane.close()
    with pytest.raises(ValueError, match="closed"):
        lane.poll(0.0, 0.0)


# ---- through a real daemon ----


def cycle(client: DaemonClient, pages: int, times: int) -> None:
    for _ in range(times):
        got = client.acquire(pages, wait=5.0)
        assert len(got.pages) == pages, got.shortfall
        client.release(got.pages)


def test_the_daemon_counts_every_grant_the_lane_serves(tmp_path: Path):
    runtime_dir = tmp_path / "rt"
    with DaemonProcess(runtime_dir, "host", "64MiB") as daemon, DaemonClient("lane", runtime_dir=runtime_dir) as c:
        cycle(c, 8, 50)
        status = wait_for(
            lambda: (s := daemon.status()).model("lane").pages_returned_total == 400 and s, what="every return counted"
        )
        model, head = status.model("lane"), status.daemon
        assert (model.grants, model.pages_granted_total, model.mapped_pages) == (50, 400, 0)
        assert head.grants == 50
        # Pages parked as the engine's credit are free (dirty with its data), never granted.
        assert head.pages_granted == 0 and head.pages_free == head.pages_created
        got = c.acquire(3, wait=5.0)
        wait_for(lambda: daemon.status().model("lane").mapped_pages == 3, what="3 pages held")
        assert daemon.status().daemon.pages_granted == 3
        c.release(got.pages)


@pytest.mark.parametrize("device_kind", ["host", "cuda"])
def test_a_limit_set_while_the_lane_serves_an_engine_holds_at_once(device_kind: str, tmp_path: Path):
    runtime_dir = tmp_path / "rt"
    with (
        DaemonProcess(runtime_dir, device_kind, "64MiB") as daemon,
        DaemonClient("lane", runtime_dir=runtime_dir) as client,
        ControlClient(runtime_dir=runtime_dir) as control,
    ):
        cycle(client, 8, 5)  # its 8 pages are its credit now
        control.set_limit("lane", 4 * PAGE)
        got = client.acquire(8, wait=0.5)
        assert len(got.pages) <= 4 and got.shortfall is not None and got.shortfall.reason == "limit"
        assert daemon.status().model("lane").mapped_pages <= 4
        client.release(got.pages)


def test_another_model_is_granted_the_pages_parked_as_an_engines_credit(tmp_path: Path):
    """The whole budget parked as A's credit: B's GROW gets it (the pages zeroed for B), and no page is lost."""
    runtime_dir = tmp_path / "rt"
    with (
        DaemonProcess(runtime_dir, "host", f"{8 * 2}MiB", "--reserve", "0", "8") as daemon,
        DaemonClient("a", runtime_dir=runtime_dir) as a,
        DaemonClient("b", runtime_dir=runtime_dir) as b,
    ):
        cycle(a, 8, 3)
        got = b.acquire(8, wait=10.0)
        assert len(got.pages) == 8, got.shortfall
        head = wait_for(lambda: (h := daemon.status().daemon).pages_granted == 8 and h, what="B's pages counted")
        assert head.pages_created == 8
        b.release(got.pages)
        cycle(a, 8, 1)


def test_an_engine_killed_while_armed_gives_every_page_back(tmp_path: Path):
    runtime_dir = tmp_path / "rt"
    with DaemonProcess(runtime_dir, "host", "64MiB") as daemon, EngineProcess(runtime_dir, "gone") as engine:
        for _ in range(3):
            assert engine.call("grow", 4)["granted"] == 4
            assert len(engine.call("return", 4)["returned"]) == 4
        assert engine.call("grow", 4)["granted"] == 4  # 4 lane-granted pages held, none of credit
        engine.kill()
        head = wait_for(lambda: (h := daemon.status().daemon).pages_granted == 0 and h, what="every page back")
        assert head.pages_free == head.pages_created


@pytest.fixture(scope="module")
def fuzzed_daemon(tmp_path_factory: pytest.TempPathFactory):
    with DaemonProcess(tmp_path_factory.mktemp("lane") / "rt", "host", "32MiB") as daemon:
        yield daemon


_ENGINES = itertools.count()


_ANY_WORD = st.integers(0, 2**32 - 1)
# A word of a frame: an id of the engine's credit (by index, resolved once the engine knows its ids),
# a small number (a page count, a wait, an id near those in use) or anything at all.
_WORD = st.one_of(st.tuples(st.just("credit"), st.integers(0, 3)), st.integers(0, 20), _ANY_WORD)
_FUZZED_FRAME = st.fixed_dictionaries(
    {
        "on_channel": st.booleans(),
        "type": st.sampled_from([MsgType.GROW, MsgType.RETURN, MsgType.GRANT, MsgType.USAGE, MsgType.LAYOUT]),
        "words": st.one_of(st.lists(_WORD, min_size=3, max_size=3), st.lists(_WORD, max_size=6)),
        # mostly right, sometimes a version the daemon does not speak or a length that does not match
        "version_step": st.sampled_from([0, 0, 0, 0, 1]),
        "length_error": st.sampled_from([0, 0, 0, 0, -4, 4]),
    }
)
_WELL_FORMED = {"version_step": st.just(0), "length_error": st.just(0)}
# What the lane serves: a GROW on the channel, a RETURN of the engine's pages on its connection.
_LANE_FRAME = st.one_of(
    st.fixed_dictionaries(
        {
            "on_channel": st.just(True),
            "type": st.just(MsgType.GROW),
            "words": st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(0, 10)).map(list),
            **_WELL_FORMED,
        }
    ),
    st.fixed_dictionaries(
        {
            "on_channel": st.just(False),
            "type": st.just(MsgType.RETURN),
            "words": st.lists(
                st.one_of(st.tuples(st.just("credit"), st.integers(0, 3)), st.integers(0, 20)), max_size=5
            ),
            **_WELL_FORMED,
        }
    ),
)
_FRAME = st.one_of(_LANE_FRAME, _FUZZED_FRAME)


def _frame_bytes(frame: dict, credit: list[int]) -> bytes:
    """`frame` as sent: its words packed as the grant path packs them (a USAGE or LAYOUT word list
    as the JSON body's one count), its credit indexes resolved to the engine's credit ids."""
    words = [credit[w[1]] if isinstance(w, tuple) else w for w in frame["words"]]
    if frame["type"] in protocol.PACKED:
        body = struct.pack(f"!{len(words)}I", *words)
    else:
        body = json.dumps({"used_pages": words[0] if words else -1}).encode()
    length = max(0, len(body) + frame["length_error"])
    version = protocol.PROTOCOL_VERSION + frame["version_step"]
    return protocol.HEADER.pack(protocol.MAGIC, version, frame["type"], 0, length) + body


def _armed_engine_sends(daemon: DaemonProcess, model: str, frames: list[dict]) -> None:
    """In a forked child: an engine takes 4 pages on its channel and returns them (parked as its
    credit), sends `frames` in order, each on its channel or its connection, reads what comes back on
    both for a moment and exits without returning anything it was granted."""
    engine = RawEngine(daemon, model)
    channel = engine.open_channel()
    channel.send(protocol.encode(MsgType.GROW, {"req": 1, "pages": 4, "wait_ms": 1000}))
    credit, done = [], False
    while not done:  # another model's pages are zeroed first: the grant may come in parts
        grant = engine.receive(channel)
        credit, done = credit + grant["pages"], grant["done"]
    engine.sock.send(protocol.encode(MsgType.RETURN, {"pages": credit}))
    daemon.wait_for_model(model, lambda m: m.mapped_pages == 0, what="the return")
    try:
        for frame in frames:
            (channel if frame["on_channel"] else engine.sock).send(_frame_bytes(frame, credit))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon refused an earlier frame and closed
    for sock in (channel, engine.sock):
        sock.settimeout(0.05)
        try:
            while True:
                engine.receive(sock)
        except (TimeoutError, ConnectionError, protocol.ConnectionClosed, protocol.ProtocolError):
            pass  # nothing more to read, or the daemon refused a frame and closed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(_FRAME, min_size=1, max_size=4))
def test_frames_sent_by_an_armed_engine_are_served_or_refused_and_no_page_goes_missing(fuzzed_daemon, frames):
    """An engine armed with 4 pages of credit sends a few near-valid frames (its credit's ids, small
    counts, any words, a wrong version or length) on its connection or its channel and exits holding
    whatever it was granted: whatever the lane or the daemon made of the frames, the daemon lives and
    every page comes back free (a dead engine's pages are released when its pidfd says it exited)."""
    daemon, model = fuzzed_daemon, f"armed-{next(_ENGINES)}"
    pid = os.fork()
    if pid == 0:  # the engine: exit status 0 once the frames are sent, 1 if anything before failed
        status = 1
        try:
            _armed_engine_sends(daemon, model, frames)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, "the engine could not arm and send its frames"
    head = wait_for(
        lambda: (h := daemon.status().daemon).pages_granted == 0 and h.pages_quarantined == 0 and h,
        what="every page back",
    )
    assert head.pages_free == head.pages_created <= head.budget_pages
    assert daemon.proc.poll() is None
