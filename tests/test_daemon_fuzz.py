"""Malformed input against a real kvmemd process: every bad connection is refused, the daemon lives on.

One daemon (host device, 32 MiB budget) serves the whole module, with one real engine process attached
and holding pages. Hypothesis then throws garbage at the daemon's socket, one fresh connection per
example: random bytes, well-framed random JSON, and a valid HELLO followed by a message that breaks a
rule (wrong types, unknown or missing fields, huge or negative numbers, pages not held, daemon-only
messages, descriptors where none belong, frames over MAX_FRAME). For each, the daemon must answer
with an ERROR and close, or just close; it must never crash, leak a descriptor or disturb the engine.
"""

from __future__ import annotations

import tests.support  # noqa: F401  # isort: skip  (loads the fake CUDA driver first)

import copy
import json
import os
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from kvmem.common import protocol
from kvmem.common.protocol import (
    HEADER,
    MAGIC,
    MAX_FRAME,
    PACKED,
    PROTOCOL_VERSION,
    SCHEMAS,
    ConnectionClosed,
    MsgType,
    ProtocolError,
)
from kvmem.common.status import ModelState
from tests.daemon_support import DaemonProcess, EngineProcess, cleanup_shm, wait_for
from tests.support import pack_unchecked

ENGINE_MODEL = "fuzz-engine"
PAGE_SIZE = 2 << 20  # the host device's granularity, the daemon's default page size
FUZZ_MODELS = ("fuzz-a", "fuzz-b", "fuzz-c")
CLIENT_TYPES = (MsgType.HELLO, MsgType.GROW, MsgType.RETURN, MsgType.USAGE, MsgType.ADOPT, MsgType.CONTROL)
DAEMON_TYPES = tuple(t for t in MsgType if t >= MsgType.WELCOME)
ENGINE_ACCEPTS = {MsgType.GROW, MsgType.USAGE, MsgType.SLEPT, MsgType.DRAIN}  # valid ones are served, not refused
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

VALID: dict[MsgType, dict[str, Any]] = {
    MsgType.HELLO: {
        "version": PROTOCOL_VERSION,
        "role": "engine",
        "model": "fuzz-a",
        "asleep": False,
        "adopt": 0,
        "page_size": 0,
    },
    MsgType.GROW: {"req": 1, "pages": 1, "wait_ms": 0},
    MsgType.RETURN: {"pages": [0]},
    MsgType.USAGE: {"used_pages": 0},
    MsgType.ADOPT: {"pages": [0]},
    MsgType.CONTROL: {"req": 1, "op": "status", "model": None, "value": None},
    MsgType.SLEPT: {},
    MsgType.OFFLOAD: {"pages": [0], "offsets": [0]},
    MsgType.LAYOUT: {"layout": {"version": 1, "shape": [1024, 16, 1, 64]}},
    MsgType.CHANNEL: {},
    MsgType.DRAIN: {"hook": True},
    MsgType.WELCOME: {
        "version": PROTOCOL_VERSION,
        "client_id": 1,
        "slot": 0,
        "page_size": PAGE_SIZE,
        "device_kind": "host",
        "device_ordinal": 0,
        "device_uuid": None,
        "budget_pages": 16,
    },
    MsgType.GRANT: {"req": 1, "pages": [0, 1], "done": True},
    MsgType.DENY: {"req": 1, "reason": "budget", "detail": "", "granted": 0},
    MsgType.RECLAIM: {"pages": 1, "deadline_ms": 100, "reason": "pressure"},
    MsgType.POLICY: {"limit_pages": -1, "min_pages": 0, "priority": 0, "target_pages": -1},
    MsgType.SLEEP: {"offload": False},
    MsgType.WAKE: {"restored": True},
    MsgType.ADOPTED: {"mapping": [[0, 1]], "done": True},
    MsgType.REPLY: {"req": 1, "ok": True, "error": None, "code": None, "data": None},
    MsgType.ERROR: {"message": "no"},
    MsgType.GOODBYE: {"reason": "bye"},
    MsgType.RESTORE: {"pages": [0], "offsets": [0]},
}


# ---- the daemon and its engine ----


def daemon_fds(daemon: DaemonProcess) -> int:
    return psutil.Process(daemon.pid).num_fds()


def settled_fds(daemon: DaemonProcess, quiet: float = 0.3, timeout: float = 10.0) -> int:
    """The daemon's descriptor count once it has stayed the same for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last, since = daemon_fds(daemon), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = daemon_fds(daemon)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    raise AssertionError(f"the daemon's descriptor count did not settle (last {last})")


@dataclass
class World:
    daemon: DaemonProcess
    engine: EngineProcess
    baseline_fds: int
    examples: dict[str, int] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    runtime_dir = tmp_path_factory.mktemp("fuzz") / "rt"
    daemon = DaemonProcess(runtime_dir, "host", "32MiB")
    stopped = False
    try:
        with EngineProcess(runtime_dir, ENGINE_MODEL) as engine:
            grown = engine.call("grow", 2)
            assert grown["granted"] == 2, grown
            wait_for(lambda: daemon.status().daemon.pages_created == 16, what="the pool to fill its reserve")
            yield World(daemon, engine, settled_fds(daemon))
            assert engine.exit() == 0
        daemon.stop()  # exit code 0, and no socket, lock file or status segment left behind
        stopped = True
    finally:
        if not stopped:
            daemon.kill()  # running or already dead: reap it and close its log
        cleanup_shm(daemon.paths.shm_name)


# ---- talking to it ----

# Kinds of descriptor to attach. "memfd" is page-sized: any such memfd is a valid host page to adopt.
# The others never are: "small-memfd" (wrong size), pipe ends, and page-sized regular files on tmpfs
# ("shm-file") and on the temp dir's file system ("tmp-file").
FdKind = str
NOT_A_PAGE = ("small-memfd", "pipe-r", "pipe-w", "shm-file", "tmp-file")
ANY_FD = ("memfd", *NOT_A_PAGE)


@dataclass
class Scenario:
    """Datagrams to send on one fresh connection, and what a correct daemon answers before refusing."""

    frames: list[tuple[bytes, list[FdKind]]]
    greeting: tuple[MsgType, ...] = ()
    may_close_silently: bool = False

    def __repr__(self) -> str:  # keep Hypothesis' report readable when a frame is 64 KiB
        shown = [(f[:120] + (b"..." if len(f) > 120 else b""), len(f), kinds) for f, kinds in self.frames]
        return f"Scenario(frames={shown}, greeting={self.greeting}, silent_ok={self.may_close_silently})"


def make_fds(kinds: list[FdKind]) -> tuple[list[int], list[int]]:
    """Descriptors to attach, and every descriptor opened for them (to close after sending)."""
    attach: list[int] = []
    opened: list[int] = []
    for kind in kinds:
        if kind in ("memfd", "small-memfd"):
            fd = os.memfd_create("kvmem-page", os.MFD_CLOEXEC)
            os.ftruncate(fd, PAGE_SIZE if kind == "memfd" else 4096)
            attach.append(fd)
            opened.append(fd)
        elif kind in ("shm-file", "tmp-file"):
            fd, path = tempfile.mkstemp(prefix="kvmem-fuzz-", dir="/dev/shm" if kind == "shm-file" else None)
            os.unlink(path)
            os.ftruncate(fd, PAGE_SIZE)
            attach.append(fd)
            opened.append(fd)
        else:
            r, w = os.pipe2(os.O_CLOEXEC)
            attach.append(r if kind == "pipe-r" else w)
            opened += [r, w]
    return attach, opened


def exchange(daemon: DaemonProcess, scenario: Scenario, timeout: float = 5.0) -> list[MsgType]:
    """Send the scenario's datagrams on a new connection; return what the daemon sent until it closed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    received: list[MsgType] = []
    try:
        sock.connect(str(daemon.paths.socket))
        for data, kinds in scenario.frames:
            attach, opened = make_fds(kinds)
            try:
                sock.sendmsg([data], protocol.ancillary_for(attach))
            except (BrokenPipeError, ConnectionResetError):
                break  # the daemon already refused an earlier datagram and closed
            finally:
                protocol.close_fds(opened)
        while True:
            try:
                msg = protocol.receive_message(sock)  # whatever the daemon sends must itself be valid
            except ConnectionClosed:
                return received
            except TimeoutError:
                raise AssertionError(f"the daemon left the connection open after {received}") from None
            protocol.close_fds(msg.fds)
            received.append(msg.type)
    finally:
        sock.close()


def assert_alive(daemon: DaemonProcess) -> None:
    assert daemon.proc.poll() is None, f"kvmemd died ({daemon.proc.returncode}):\n{daemon.log()[-3000:]}"


def assert_refused(world: World, scenario: Scenario, category: str) -> None:
    """The daemon refuses the scenario: the greeting a valid HELLO earns, then an ERROR (or, where allowed,
    nothing), then the close; and it is still running."""
    daemon = world.daemon
    assert_alive(daemon)  # (if an earlier example killed it, say so rather than blame this one)
    received = exchange(daemon, scenario)
    assert_alive(daemon)
    greeting = list(scenario.greeting)
    assert received[: len(greeting)] == greeting, f"expected the greeting {greeting}, got {received}"
    rest = received[len(greeting) :]
    allowed = ([], [MsgType.ERROR]) if scenario.may_close_silently else ([MsgType.ERROR],)
    assert rest in allowed, f"expected an ERROR then close, got {received}"
    world.examples[category] = world.examples.get(category, 0) + 1


def raw_frame(msg_type: int, body: Any, *, version: int = PROTOCOL_VERSION, zero: int = 0, length: int | None = None):
    """A frame built by hand. A dict body of a packed type is packed when its values fit the packed layout
    (u32s), so that its values, not its encoding, are what the daemon judges; otherwise it goes as JSON."""
    if isinstance(body, dict) and msg_type in PACKED:
        try:
            payload = pack_unchecked(MsgType(msg_type), body)
        except (KeyError, TypeError, struct.error):
            payload = json.dumps(body).encode()  # cannot be packed: refused for its layout
    else:
        payload = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    size = len(payload) if length is None else length
    return HEADER.pack(MAGIC, version, msg_type, zero, size) + payload


def would_be_served(frame: bytes, kinds: list[FdKind], role: str | None, adopt: int = 0) -> bool:
    """Whether a correct daemon would accept `frame` (with descriptors of `kinds`) on a connection in `role`
    (None: before HELLO), even in part, rather than refuse it. Such input is not malformed: the fuzzer
    discards it."""
    if len(frame) > MAX_FRAME:
        return False
    try:
        msg = protocol.decode(frame, list(range(len(kinds))))
    except ProtocolError:
        return False
    if role is None:
        return msg.type == MsgType.HELLO  # (even a refused HELLO is discarded here: see test_refused_hellos)
    if role == "control":
        return msg.type == MsgType.CONTROL
    if msg.type in ENGINE_ACCEPTS:
        return True
    if msg.type == MsgType.RETURN:
        return msg["pages"] == []  # returning nothing is allowed; any id is one this connection does not hold
    if msg.type == MsgType.ADOPT:
        # Refused: more pages than HELLO announced, or a descriptor that is no page before any that is (a
        # page adopted before the refusal would stay, quarantined while this test process lives).
        return msg["pages"] == [] or (len(msg["pages"]) <= adopt and "memfd" in kinds)
    return False


# ---- strategies ----

fd_kinds = st.lists(st.sampled_from(ANY_FD), max_size=4)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=16)
)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = sorted({name for schema in SCHEMAS.values() for name in schema})
bodies = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=10), json_values, max_size=7)
long_text = st.text(min_size=1100, max_size=1400)
wrong_values = (
    st.text(max_size=8)
    | long_text
    | st.lists(long_text, min_size=1, max_size=2)
    | st.booleans()
    | st.floats()
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
    | st.integers(min_value=2**63)
    | st.integers(max_value=-(2**31) - 1)
)
HUGE_LITERALS = ["2147483648", "18446744073709551616", "-99999999999999999999", "1e400", "9" * 5000, "-" + "7" * 4400]


def valid(msg_type: MsgType) -> dict[str, Any]:
    return copy.deepcopy(VALID[msg_type])


def fds_for(msg_type: MsgType, body: dict[str, Any]) -> list[FdKind]:
    pages = body.get("pages")
    n = len(pages) if msg_type in protocol.FDS_ALLOWED and isinstance(pages, list) else 0
    return ["memfd" if msg_type == MsgType.GRANT else "small-memfd"] * n


@st.composite
def wrong_type(draw) -> tuple[bytes, list[FdKind]]:
    msg_type = draw(st.sampled_from([t for t in MsgType if SCHEMAS[t]]))
    body = valid(msg_type)
    body[draw(st.sampled_from(sorted(SCHEMAS[msg_type])))] = draw(wrong_values)
    return raw_frame(msg_type, body), fds_for(msg_type, body)


@st.composite
def unknown_field(draw) -> tuple[bytes, list[FdKind]]:
    msg_type = draw(st.sampled_from(list(MsgType)))
    body = valid(msg_type)
    keys = (st.text(min_size=1, max_size=40) | long_text).filter(lambda k: k not in SCHEMAS[msg_type])
    extras = draw(st.dictionaries(keys, json_values, min_size=1, max_size=40))
    body |= extras
    return raw_frame(msg_type, body), fds_for(msg_type, body)


@st.composite
def missing_fields(draw) -> tuple[bytes, list[FdKind]]:
    msg_type = draw(st.sampled_from([t for t in MsgType if SCHEMAS[t]]))
    body = valid(msg_type)
    for name in draw(st.sets(st.sampled_from(sorted(body)), min_size=1)):
        del body[name]
    return raw_frame(msg_type, body), draw(fd_kinds)


@st.composite
def huge_int(draw) -> tuple[bytes, list[FdKind]]:
    msg_type = draw(st.sampled_from([MsgType.GROW, MsgType.USAGE, MsgType.CONTROL, MsgType.HELLO]))
    name = draw(st.sampled_from([n for n, c in SCHEMAS[msg_type].items() if isinstance(c, protocol.Int)]))
    text = json.dumps(valid(msg_type) | {name: "@HUGE@"}).replace('"@HUGE@"', draw(st.sampled_from(HUGE_LITERALS)))
    return raw_frame(msg_type, text), []


@st.composite
def negative_counts(draw) -> tuple[bytes, list[FdKind]]:
    choice = draw(st.sampled_from(["grow", "grow-wait", "return", "usage", "adopt"]))
    neg = draw(st.integers(max_value=0))
    if choice == "grow":
        return raw_frame(MsgType.GROW, valid(MsgType.GROW) | {"pages": neg}), []
    if choice == "grow-wait":
        return raw_frame(MsgType.GROW, valid(MsgType.GROW) | {"wait_ms": neg - 1}), []
    if choice == "usage":
        return raw_frame(MsgType.USAGE, {"used_pages": neg - 1}), []
    ids = [*draw(st.lists(st.integers(0, 100), max_size=3)), neg - 1]
    msg_type = MsgType.RETURN if choice == "return" else MsgType.ADOPT
    return raw_frame(msg_type, {"pages": ids}), ["memfd"] * len(ids) if msg_type == MsgType.ADOPT else []


@st.composite
def return_not_held(draw) -> tuple[bytes, list[FdKind]]:
    # Any id, including the engine's own pages: this connection holds none of them.
    ids = draw(st.lists(st.integers(0, 2**31 - 1) | st.integers(0, 20), min_size=1, max_size=40))
    return raw_frame(MsgType.RETURN, {"pages": ids}), []


@st.composite
def not_for_this_client(draw) -> tuple[bytes, list[FdKind]]:
    """A valid message the client may not send: any daemon->client type (GRANT with its descriptors), HELLO
    again, CONTROL from an engine, engine messages from a control client."""
    msg_type = draw(st.sampled_from([*DAEMON_TYPES, *CLIENT_TYPES, MsgType.SLEPT]))
    body = valid(msg_type)
    if msg_type == MsgType.GRANT:
        body["pages"] = draw(st.lists(st.integers(0, 1000), max_size=5))
    return raw_frame(msg_type, body), fds_for(msg_type, body)


@st.composite
def descriptors_where_none_belong(draw) -> tuple[bytes, list[FdKind]]:
    msg_type = draw(st.sampled_from([t for t in MsgType if t not in protocol.FDS_ALLOWED]))
    kinds = draw(st.lists(st.sampled_from(ANY_FD), min_size=1, max_size=4))
    return raw_frame(msg_type, valid(msg_type)), kinds


@st.composite
def wrong_descriptor_count(draw) -> tuple[bytes, list[FdKind]]:
    msg_type = draw(st.sampled_from(sorted(protocol.FDS_ALLOWED)))
    ids = draw(st.lists(st.integers(0, 50), max_size=4))
    n = draw(st.integers(0, 6).filter(lambda n: n != len(ids)))
    body = valid(msg_type) | {"pages": ids}
    return raw_frame(msg_type, body), ["memfd"] * n


@st.composite
def oversized(draw) -> tuple[bytes, list[FdKind]]:
    size = draw(st.integers(MAX_FRAME + 1, 2 * MAX_FRAME))
    head = draw(st.sampled_from([b"", raw_frame(MsgType.GROW, valid(MsgType.GROW))[:12], MAGIC]))
    filler = draw(st.binary(min_size=1, max_size=16))
    data = (head + filler * (size // len(filler) + 1))[:size]
    return data, draw(fd_kinds)


@st.composite
def bad_adopt(draw, announced: int) -> tuple[bytes, list[FdKind]]:
    """ADOPT of descriptors that are not host pages, or of more pages than HELLO announced."""
    n = draw(st.integers(1, announced + 2))
    ids = draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n))
    kinds = draw(st.lists(st.sampled_from(NOT_A_PAGE if n <= announced else ANY_FD), min_size=n, max_size=n))
    return raw_frame(MsgType.ADOPT, {"pages": ids}), kinds


INVALID_AFTER_HELLO = {
    "wrong-type": wrong_type(),
    "unknown-field": unknown_field(),
    "missing-field": missing_fields(),
    "huge-int": huge_int(),
    "negative-count": negative_counts(),
    "return-not-held": return_not_held(),
    "not-for-this-client": not_for_this_client(),
    "fds-where-none-belong": descriptors_where_none_belong(),
    "wrong-fd-count": wrong_descriptor_count(),
    "oversized": oversized(),
    "random-json": st.tuples(st.sampled_from(list(MsgType)), bodies).map(lambda tb: (raw_frame(tb[0], tb[1]), [])),
}


@st.composite
def hello_then_invalid(draw, category: str) -> Scenario:
    role = draw(st.sampled_from(["engine", "control"]))
    adopt = draw(st.sampled_from([0, 0, 1, 3])) if role == "engine" else 0
    hello = {
        "version": PROTOCOL_VERSION,
        "role": role,
        "model": draw(st.sampled_from(FUZZ_MODELS)) if role == "engine" else None,
        # An engine saying it sleeps would leave its model asleep for the next examples (they would
        # be greeted with SLEEP too): the refused HELLOs below draw it, where nothing is attached.
        "asleep": role == "control" and draw(st.booleans()),
        "adopt": adopt,
        "page_size": PAGE_SIZE if adopt else draw(st.sampled_from([0, PAGE_SIZE])),
    }
    if category == "bad-adopt":
        assume(adopt > 0)
        data, kinds = draw(bad_adopt(adopt))
    else:
        data, kinds = draw(INVALID_AFTER_HELLO[category])
    assume(not would_be_served(data, kinds, role, adopt))
    greeting = (MsgType.WELCOME, MsgType.POLICY) if role == "engine" else (MsgType.WELCOME,)
    return Scenario([(protocol.encode(MsgType.HELLO, hello), []), (data, kinds)], greeting)


# ---- the fuzzing ----


@FUZZ
@given(data=st.binary(max_size=300) | st.binary(max_size=64).map(lambda b: MAGIC + b), kinds=fd_kinds)
@example(data=b"", kinds=[])
@example(data=b"", kinds=["pipe-r"])
@example(data=MAGIC + b"\x01\x01\x00\x00\xff\xff\xff\xff", kinds=[])
def test_random_bytes_are_refused(world: World, data: bytes, kinds: list[FdKind]):
    """Random datagrams (some starting with the magic), with or without descriptors, are refused; only an
    empty datagram without descriptors (which reads as a close) may end the connection without an ERROR."""
    assume(not would_be_served(data, kinds, None))
    assert_refused(world, Scenario([(data, kinds)], may_close_silently=not data and not kinds), "random-bytes")


@FUZZ
@given(
    msg_type=st.sampled_from(list(MsgType)) | st.integers(0, 255),
    version=st.sampled_from([PROTOCOL_VERSION] * 3 + [0, PROTOCOL_VERSION - 1, 255]),
    zero=st.sampled_from([0, 0, 0, 1]),
    length_delta=st.sampled_from([0, 0, 0, 0, -1, 1, 1000]),
    body=bodies | json_values,
    ascii_only=st.booleans(),
)
@example(msg_type=MsgType.SLEPT, version=PROTOCOL_VERSION, zero=0, length_delta=0, body={}, ascii_only=True)
@example(
    msg_type=MsgType.USAGE,
    version=PROTOCOL_VERSION,
    zero=0,
    length_delta=0,
    body={"used_pages": 2**80},
    ascii_only=True,
)
def test_framed_random_json_is_refused(
    world: World, msg_type: int, version: int, zero: int, length_delta: int, body: Any, ascii_only: bool
):
    """A header (mostly valid, sometimes with a bad version, padding or length) over random JSON is refused
    as a first message: it is malformed, or it is not a HELLO."""
    payload = json.dumps(body, ensure_ascii=ascii_only).encode()
    frame = raw_frame(msg_type, payload, version=version, zero=zero, length=max(0, len(payload) + length_delta))
    assume(not would_be_served(frame, [], None))
    assert_refused(world, Scenario([(frame, [])]), "random-json")


@pytest.mark.parametrize("category", [*INVALID_AFTER_HELLO, "bad-adopt"])
@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_invalid_messages_after_a_valid_hello_are_refused(world: World, category: str, data: st.DataObject):
    """After a valid engine or control HELLO (greeted with WELCOME, and POLICY for an engine), any
    well-framed but invalid message, or one this client may not send, earns an ERROR and the close."""
    assert_refused(world, data.draw(hello_then_invalid(category)), category)


REFUSED_HELLOS = [
    ("version", {"version": PROTOCOL_VERSION - 1}),
    ("version", {"version": PROTOCOL_VERSION + 1}),
    ("version", {"version": 0}),
    ("engine-without-model", {"model": None}),
    ("model-attached-by-another", {"model": ENGINE_MODEL}),
    ("adopt-with-wrong-page-size", {"adopt": 1, "page_size": 4096}),
    ("adopt-with-no-page-size", {"adopt": 5, "page_size": 0}),
]


@FUZZ
@given(
    case=st.sampled_from(REFUSED_HELLOS),
    role=st.sampled_from(["engine", "control"]),
    asleep=st.booleans(),
)
def test_refused_hellos(world: World, case: tuple[str, dict[str, Any]], role: str, asleep: bool):
    """Schema-valid HELLOs the daemon must still refuse: other protocol versions, an engine without a model,
    a model another engine holds, adoption of pages of another size."""
    name, changes = case
    if name != "version":
        role = "engine"
    hello = {"version": PROTOCOL_VERSION, "role": role, "model": "fuzz-a", "asleep": asleep, "adopt": 0}
    hello["page_size"] = 0
    hello |= changes
    assert_refused(world, Scenario([(protocol.encode(MsgType.HELLO, hello), [])]), f"hello-{name}")


ENGINE_HELLO = VALID[MsgType.HELLO] | {"model": "fuzz-c"}
KILLERS = {
    # Each of these used to kill kvmemd: decode let a bare ValueError out, or the refusal quoted so much
    # of the peer's data that the ERROR reply itself failed to encode (the exception escaped the loop).
    "int-over-the-digit-limit": raw_frame(MsgType.USAGE, '{"used_pages": ' + "9" * 5000 + "}"),
    "long-unknown-key": raw_frame(MsgType.USAGE, {"used_pages": 1, "k" * 2000: 0}),
    # (GROW and RETURN, where these were found, have packed bodies now; OFFLOAD and USAGE keep the JSON path.)
    "many-unknown-keys": raw_frame(MsgType.USAGE, {**VALID[MsgType.USAGE], **{f"extra_{i}": i for i in range(300)}}),
    "long-string-as-page-id": raw_frame(MsgType.OFFLOAD, {"pages": ["A" * 2000], "offsets": [0]}),
    "long-list-as-page-id": raw_frame(MsgType.OFFLOAD, {"pages": [list(range(1000))], "offsets": [0]}),
}


@pytest.mark.parametrize("name", sorted(KILLERS))
@pytest.mark.parametrize("after_hello", [False, True], ids=["first", "after-hello"])
def test_inputs_that_used_to_kill_the_daemon_are_refused(world: World, name: str, after_hello: bool):
    """Regression cases found by this fuzzer, as the first message and after a valid HELLO."""
    frames = [(protocol.encode(MsgType.HELLO, ENGINE_HELLO), [])] if after_hello else []
    greeting = (MsgType.WELCOME, MsgType.POLICY) if after_hello else ()
    assert_refused(world, Scenario([*frames, (KILLERS[name], [])], greeting), f"killer-{name}")


def test_another_client_cannot_return_the_engines_pages(world: World):
    """A second engine connection naming the engine's real page ids in a RETURN is refused; the engine
    keeps its pages."""
    ids = world.engine.call("ids")["ids"]
    assert len(ids) >= 2
    hello = VALID[MsgType.HELLO] | {"model": "fuzz-b"}
    scenario = Scenario(
        [(protocol.encode(MsgType.HELLO, hello), []), (protocol.encode(MsgType.RETURN, {"pages": ids}), [])],
        greeting=(MsgType.WELCOME, MsgType.POLICY),
    )
    assert_refused(world, scenario, "return-others-pages")
    assert world.daemon.status().model(ENGINE_MODEL).mapped_pages == len(ids)


def test_adopting_a_file_with_a_long_path_is_refused(world: World, tmp_path: Path):
    """ADOPT of a descriptor for a regular file whose path is over 1024 characters is refused with an ERROR.
    (The refusal used to quote the whole path: the ERROR then failed to encode and the daemon died.)"""
    deep = tmp_path
    for i in range(6):
        deep = deep / f"{i}{'d' * 200}"
    deep.mkdir(parents=True)
    (deep / "page").write_bytes(b"\0" * PAGE_SIZE)
    fd = os.open(deep / "page", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert_alive(world.daemon)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(5)
        with sock:
            sock.connect(str(world.daemon.paths.socket))
            protocol.send_message(sock, MsgType.HELLO, ENGINE_HELLO | {"adopt": 1, "page_size": PAGE_SIZE})
            protocol.send_message(sock, MsgType.ADOPT, {"pages": [0]}, [fd])
            received = []
            try:
                while True:
                    received.append(protocol.receive_message(sock).type)
            except ConnectionClosed:
                pass
        assert received == [MsgType.WELCOME, MsgType.POLICY, MsgType.ERROR]
        assert_alive(world.daemon)
    finally:
        os.close(fd)


# ---- afterwards ----


def test_the_daemon_is_unharmed_after_the_fuzzing(world: World):
    """After all of the above: the daemon runs, holds exactly the descriptors it held before (nothing any
    refused connection sent or opened is left), still grants to the engine, and its status shows the
    engine's pages; it logged no traceback."""
    daemon = world.daemon
    assert daemon.proc.poll() is None
    wait_for(lambda: daemon_fds(daemon) == world.baseline_fds, timeout=5, what="the descriptor count to settle")
    grown = world.engine.call("grow", 1)
    assert (grown["granted"], grown["denied"]) == (1, None), grown
    # The engine may get its GRANT a moment before the daemon publishes the status that counts it.
    wait_for(lambda: getattr(daemon.status().model(ENGINE_MODEL), "mapped_pages", 0) == 3, timeout=5, what="3 pages")
    model = daemon.status().model(ENGINE_MODEL)
    assert (model.mapped_pages, model.state) == (3, ModelState.AWAKE)
    assert model.pid == world.engine.pid
    # The grant may leave one more descriptor: the pool may keep the new page's export for later grants.
    assert settled_fds(daemon) in (world.baseline_fds, world.baseline_fds + 1)
    assert "Traceback" not in daemon.log()
