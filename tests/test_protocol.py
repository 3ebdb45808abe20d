"""`kvmem.common.protocol`: frames, schemas and descriptor passing, over real SOCK_SEQPACKET sockets and real memfds."""

from __future__ import annotations

import copy
import errno
import itertools
import json
import os
import resource
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmem.common import protocol
from kvmem.common.protocol import (
    FDS_ALLOWED,
    HEADER,
    MAGIC,
    MAX_FDS_PER_MESSAGE,
    MAX_FRAME,
    MAX_PAGES_PER_REQUEST,
    PACKED,
    PROTOCOL_VERSION,
    SCHEMAS,
    ConnectionClosed,
    MsgType,
    ProtocolError,
)
from tests.support import REPO, pack_unchecked

# One valid body per message type, with distinctive values.
VALID: dict[MsgType, dict[str, Any]] = {
    MsgType.HELLO: {
        "version": 2,
        "role": "engine",
        "model": "meta-llama/Llama-3.1-8B@fp8",
        "asleep": True,
        "adopt": 7,
        "page_size": 2 << 20,
    },
    MsgType.GROW: {"req": 41, "pages": 9, "wait_ms": 1500},
    MsgType.RETURN: {"pages": [3, 1, 4, 15, 9]},
    MsgType.USAGE: {"used_pages": 2**40},
    MsgType.ADOPT: {"pages": [11, 12, 13]},
    MsgType.CONTROL: {"req": 2**31 - 1, "op": "set_limit", "model": "qwen2:7b", "value": 2**62},
    MsgType.SLEPT: {},
    MsgType.OFFLOAD: {"pages": [3, 9], "offsets": [0, 2 << 20]},
    MsgType.LAYOUT: {"layout": {"version": 1, "shape": [1024, 16, 1, 64]}},
    MsgType.CHANNEL: {},
    MsgType.DRAIN: {"hook": True},
    MsgType.WELCOME: {
        "version": 1,
        "client_id": 77,
        "slot": 63,
        "page_size": 2 << 20,
        "device_kind": "cuda",
        "device_ordinal": 3,
        "device_uuid": "GPU-8c4b2a10-77e1-4e5c-9f6a-0123456789ab",
        "budget_pages": 40960,
    },
    MsgType.GRANT: {"req": 5, "pages": [100, 101], "done": True},
    MsgType.DENY: {"req": 6, "reason": "budget", "detail": "no free page — budget spent", "granted": 2},
    MsgType.RECLAIM: {"pages": 12, "deadline_ms": 2000, "reason": "pressure"},
    MsgType.POLICY: {"limit_pages": -1, "min_pages": 4, "priority": -(2**31), "target_pages": 17},
    MsgType.SLEEP: {"offload": True},
    MsgType.WAKE: {"restored": True},
    MsgType.ADOPTED: {"mapping": [[11, 0], [12, 1]], "done": False},
    MsgType.REPLY: {
        "req": 9,
        "ok": True,
        "error": None,
        "code": None,
        "data": {"models": [{"a": [1, 2.5, "x", None, True]}]},
    },
    MsgType.ERROR: {"message": "ünïcode is fine"},
    MsgType.GOODBYE: {"reason": "kvmemd is stopping"},
    MsgType.RESTORE: {"pages": [4], "offsets": [6 << 20]},
}


def valid(msg_type: MsgType) -> dict[str, Any]:
    return copy.deepcopy(VALID[msg_type])


def fd_count_for(msg_type: MsgType, body: dict[str, Any]) -> int:
    if msg_type == MsgType.CHANNEL:
        return 1  # the channel's socket
    return len(body["pages"]) if msg_type in FDS_ALLOWED else 0


def body_bytes(msg_type: MsgType, body: dict[str, Any]) -> bytes:
    """A body as a sender would write it, even one that breaks the schema: packed or JSON."""
    return pack_unchecked(msg_type, body) if msg_type in PACKED else json.dumps(body).encode()


def frame(msg_type: int, payload: bytes, *, magic: bytes = MAGIC, version: int = PROTOCOL_VERSION, length=None):
    """A frame built by hand, so it can break any rule."""
    size = len(payload) if length is None else length
    return HEADER.pack(magic, version, msg_type, 0, size) + payload


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Every test in this module ends with exactly the descriptors it started with."""
    before = open_fds()
    yield
    assert open_fds() == before, "the test leaked file descriptors"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.settimeout(10)
    b.settimeout(10)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def memfds(n: int, size: int = 4096) -> list[int]:
    fds = []
    for i in range(n):
        fd = os.memfd_create(f"kvmem-test-{i}", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        fds.append(fd)
    return fds


# ---- encode / decode ----


def test_there_is_a_valid_body_for_every_message_type():
    """The round-trip table covers every type in SCHEMAS (a new type needs a body here)."""
    assert set(VALID) == set(SCHEMAS) == set(MsgType)


@pytest.mark.parametrize("msg_type", list(MsgType), ids=lambda t: t.name)
def test_encode_decode_round_trip(msg_type: MsgType):
    """Every type encodes to a header plus its body (packed, or compact JSON) and decodes to the same type,
    body and fds."""
    body = valid(msg_type)
    fake_fds = list(range(500, 500 + fd_count_for(msg_type, body)))
    data = protocol.encode(msg_type, body)
    magic, version, raw_type, zero, length = HEADER.unpack_from(data)
    assert (magic, version, raw_type, zero, length) == (MAGIC, PROTOCOL_VERSION, int(msg_type), 0, len(data) - 12)
    msg = protocol.decode(data, fake_fds)
    assert msg.type is msg_type
    assert msg.body == body
    assert msg.fds == fake_fds
    for key, value in body.items():
        assert msg[key] == value


def test_optional_fields_accept_null():
    """Optional fields (HELLO model, CONTROL model/value, REPLY error) take null."""
    hello = valid(MsgType.HELLO) | {"role": "control", "model": None, "adopt": 0}
    assert protocol.decode(protocol.encode(MsgType.HELLO, hello), []).body == hello
    control = valid(MsgType.CONTROL) | {"op": "status", "model": None, "value": None}
    assert protocol.decode(protocol.encode(MsgType.CONTROL, control), []).body == control


def test_limits_at_their_bounds_are_accepted():
    """The largest allowed values pass: page counts, id lists of MAX_FDS_PER_MESSAGE, 1024-char text."""
    protocol.validate(MsgType.GROW, {"req": 1, "pages": MAX_PAGES_PER_REQUEST, "wait_ms": 600_000}, 0)
    ids = list(range(MAX_FDS_PER_MESSAGE))
    protocol.validate(MsgType.GRANT, {"req": 1, "pages": ids, "done": False}, MAX_FDS_PER_MESSAGE)
    protocol.validate(MsgType.RETURN, {"pages": list(range(protocol.MAX_RETURN_IDS))}, 0)
    protocol.validate(MsgType.ERROR, {"message": "é" * 1024}, 0)
    protocol.validate(MsgType.HELLO, valid(MsgType.HELLO) | {"model": "a" * 64}, 0)


def test_packed_bodies_have_the_documented_layout():
    """GROW, GRANT and RETURN bodies are big-endian u32s exactly as docs/protocol.md draws them."""
    assert {MsgType.GROW, MsgType.GRANT, MsgType.RETURN} == PACKED
    grow = protocol.encode(MsgType.GROW, {"req": 41, "pages": 9, "wait_ms": 1500})
    assert grow[HEADER.size :] == bytes.fromhex("00000029 00000009 000005dc")
    grant = protocol.encode(MsgType.GRANT, {"req": 5, "pages": [100, 2**31 - 1], "done": True})
    assert grant[HEADER.size :] == bytes.fromhex("00000005 00000001 00000064 7fffffff")
    partial = protocol.encode(MsgType.GRANT, {"req": 5, "pages": [], "done": False})
    assert partial[HEADER.size :] == bytes.fromhex("00000005 00000000")
    assert protocol.encode(MsgType.RETURN, {"pages": [3, 1]})[HEADER.size :] == bytes.fromhex("00000003 00000001")
    assert protocol.encode(MsgType.RETURN, {"pages": []})[HEADER.size :] == b""


@pytest.mark.parametrize(
    ("msg_type", "payload", "n_fds", "pattern"),
    [
        (MsgType.GROW, b"", 0, r"GROW body of 0 bytes does not have the packed layout \(12 bytes\)"),
        (MsgType.GROW, bytes(11), 0, "GROW body of 11 bytes does not have the packed layout"),
        (MsgType.GROW, bytes(16), 0, "GROW body of 16 bytes does not have the packed layout"),
        (MsgType.GROW, b'{"req":1,"pages":1,"wait_ms":0}', 0, "does not have the packed layout"),
        (MsgType.GRANT, bytes(7), 0, r"GRANT body of 7 bytes does not have the packed layout \(8 bytes and 4 per"),
        (MsgType.GRANT, bytes(10), 0, "GRANT body of 10 bytes does not have the packed layout"),
        (MsgType.GRANT, struct.pack("!III", 1, 2, 7), 1, "GRANT has unknown flags 0x2"),
        (MsgType.GRANT, struct.pack("!III", 1, 0xFFFFFFFF, 7), 1, "GRANT has unknown flags 0xffffffff"),
        (MsgType.GRANT, struct.pack("!IIII", 1, 1, 7, 8), 1, "GRANT message carries 1 descriptors, expected 2"),
        (MsgType.GRANT, struct.pack("!III", 0, 1, 7), 1, "field 'req' must be an integer in"),
        (MsgType.GRANT, struct.pack("!III", 1, 1, 2**31), 1, "field 'pages' holds 2147483648, not an integer in"),
        (MsgType.GRANT, struct.pack("!II", 1, 1) + bytes(4 * 254), 254, "a list of at most 253 integers"),
        (MsgType.RETURN, bytes(3), 0, r"RETURN body of 3 bytes does not have the packed layout \(0 bytes and 4 per"),
        (MsgType.RETURN, struct.pack("!II", 1, 2**32 - 1), 0, "field 'pages' holds 4294967295, not an integer in"),
        (MsgType.RETURN, bytes(4 * 4097), 0, "a list of at most 4096 integers"),
        (MsgType.RETURN, bytes(4), 1, "RETURN message carries 1 descriptors, expected 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_packed_bodies_are_protocol_errors(msg_type: MsgType, payload: bytes, n_fds: int, pattern: str):
    """A packed body of the wrong length, with unknown flag bits, or whose values break the schema's bounds
    (ids as u32 can exceed 2^31 - 1) is refused like a JSON one."""
    with pytest.raises(ProtocolError, match=pattern):
        protocol.decode(frame(msg_type, payload), list(range(n_fds)))


JSON_TYPES = [t for t in MsgType if t not in PACKED]
MISSING = [(t, name) for t in MsgType for name in SCHEMAS[t]]


@pytest.mark.parametrize(("msg_type", "name"), MISSING, ids=[f"{t.name}-{n}" for t, n in MISSING])
def test_a_missing_field_is_refused_by_decode_and_encode(msg_type: MsgType, name: str):
    """Leaving out any field is a ProtocolError naming it, on receipt (JSON bodies; a packed body has no
    field to leave out, only bytes, see above) and before sending."""
    body = valid(msg_type)
    n_fds = fd_count_for(msg_type, body)
    del body[name]
    if msg_type not in PACKED:
        raw = frame(msg_type, json.dumps(body).encode())
        with pytest.raises(ProtocolError, match=rf"^{msg_type.name} message has missing \['{name}'\] fields$"):
            protocol.decode(raw, list(range(n_fds)))
    with pytest.raises(ProtocolError, match=rf"missing \['{name}'\]"):
        protocol.encode(msg_type, body)


@pytest.mark.parametrize("msg_type", list(MsgType), ids=lambda t: t.name)
def test_an_unknown_field_is_refused(msg_type: MsgType):
    """A field the schema does not list is refused, even next to all the right ones."""
    body = valid(msg_type) | {"sneaky": 1}
    with pytest.raises(ProtocolError, match=rf"^{msg_type.name} message has unknown \['sneaky'\] fields$"):
        protocol.validate(msg_type, body, fd_count_for(msg_type, body))
    with pytest.raises(ProtocolError, match="unknown"):
        protocol.encode(msg_type, body)


BAD_VALUES = [
    # bool is not int
    (MsgType.GROW, "pages", True, "must be an integer in"),
    (MsgType.USAGE, "used_pages", False, "must be an integer in"),
    (MsgType.HELLO, "version", True, "must be an integer in"),
    # float / string / null is not int
    (MsgType.GROW, "pages", 2.0, "must be an integer in"),
    (MsgType.GROW, "wait_ms", "10", "must be an integer in"),
    (MsgType.GROW, "req", None, "must be an integer in"),
    # out of range
    (MsgType.GROW, "pages", 0, r"must be an integer in \[1, 1048576\]"),
    (MsgType.GROW, "pages", -3, r"must be an integer in \[1, 1048576\]"),
    (MsgType.GROW, "pages", MAX_PAGES_PER_REQUEST + 1, r"must be an integer in \[1, 1048576\]"),
    (MsgType.GROW, "wait_ms", 600_001, "must be an integer in"),
    (MsgType.GROW, "req", 0, "must be an integer in"),
    (MsgType.GROW, "req", 2**31, "must be an integer in"),
    (MsgType.USAGE, "used_pages", -1, "must be an integer in"),
    (MsgType.USAGE, "used_pages", 2**64, "must be an integer in"),
    (MsgType.HELLO, "version", 256, "must be an integer in"),
    (MsgType.CONTROL, "value", 2**62 + 1, "must be an integer in"),
    (MsgType.CONTROL, "value", True, "must be an integer in"),
    (MsgType.POLICY, "priority", 2**31, "must be an integer in"),
    (MsgType.WELCOME, "slot", -2, "must be an integer in"),
    # ids out of range or not ints
    (MsgType.RETURN, "pages", [1, -1], r"holds -1, not an integer in"),
    (MsgType.RETURN, "pages", [1, True], r"holds True, not an integer in"),
    (MsgType.RETURN, "pages", [2**31], r"holds 2147483648, not an integer in"),
    (MsgType.RETURN, "pages", list(range(protocol.MAX_RETURN_IDS + 1)), "a list of at most 4096"),
    (MsgType.RETURN, "pages", {"0": 1}, "a list of at most 4096"),
    # strings: too long, wrong type, not a choice
    (MsgType.ERROR, "message", "x" * 1025, "a string of at most 1024 characters"),
    (MsgType.DENY, "detail", "x" * 1025, "a string of at most 1024 characters"),
    (MsgType.ERROR, "message", 5, "a string of at most 1024 characters"),
    (MsgType.HELLO, "role", "x" * 17, "a string of at most 16 characters"),
    (MsgType.HELLO, "role", "root", "must be one of engine, control"),
    (MsgType.CONTROL, "op", "rm -rf", "must be one of set_limit"),
    (MsgType.DENY, "reason", "because", "must be one of limit, budget, asleep, shutdown"),
    (MsgType.RECLAIM, "reason", "limit", "must be one of pressure"),
    # model names
    (MsgType.HELLO, "model", "has space", "has an invalid value 'has space'"),
    (MsgType.HELLO, "model", "-leading-dash", "has an invalid value"),
    (MsgType.HELLO, "model", "", "has an invalid value"),
    (MsgType.HELLO, "model", "naïve", "has an invalid value"),
    (MsgType.HELLO, "model", "a\nb", "has an invalid value"),
    (MsgType.HELLO, "model", "a" * 65, "a string of at most 64 characters"),
    (MsgType.CONTROL, "model", "../etc", "has an invalid value"),
    # booleans, pairs, nested JSON
    (MsgType.GRANT, "done", 1, "must be a boolean"),
    (MsgType.HELLO, "asleep", None, "must be a boolean"),
    (MsgType.ADOPTED, "mapping", [[1, 2, 3]], r"must hold \[int, int\] pairs"),
    (MsgType.ADOPTED, "mapping", [[1, -2]], r"must hold \[int, int\] pairs"),
    (MsgType.REPLY, "data", [[[[[[[["too deep"]]]]]]]], "is nested deeper than 6"),
]


@pytest.mark.parametrize(
    ("msg_type", "name", "value", "pattern"),
    BAD_VALUES,
    ids=[f"{t.name}-{n}-{i}" for i, (t, n, *_) in enumerate(BAD_VALUES)],
)
def test_a_field_of_the_wrong_type_or_range_is_refused(msg_type: MsgType, name: str, value: Any, pattern: str):
    """Each schema checker refuses what it must: wrong types (a bool is not an int), bounds, lengths, names;
    on receipt too, where the value can be written at all (packed bodies hold only u32s)."""
    body = valid(msg_type) | {name: value}
    n_fds = fd_count_for(msg_type, valid(msg_type))
    try:
        raw = frame(msg_type, body_bytes(msg_type, body))
    except (TypeError, struct.error):
        raw = None  # a packed body holds only u32s (and "done" as a flag bit): it cannot carry this value
    if raw is not None:
        with pytest.raises(ProtocolError, match=pattern):
            protocol.decode(raw, list(range(n_fds)))
    with pytest.raises(ProtocolError, match=pattern):
        protocol.encode(msg_type, body)


@pytest.mark.parametrize("msg_type", sorted(FDS_ALLOWED), ids=lambda t: t.name)
@pytest.mark.parametrize("n_fds", [0, 1, 3, 4])
def test_descriptor_carrying_types_need_one_fd_per_page(msg_type: MsgType, n_fds: int):
    """GRANT and ADOPT must carry exactly one descriptor per page id (this body has 2 or 3 ids)."""
    body = valid(msg_type)
    expected = len(body["pages"])
    raw = protocol.encode(msg_type, body)
    if n_fds == expected:
        assert protocol.decode(raw, list(range(n_fds))).fds == list(range(n_fds))
        return
    with pytest.raises(ProtocolError, match=f"carries {n_fds} descriptors, expected {expected}"):
        protocol.decode(raw, list(range(n_fds)))


@pytest.mark.parametrize("msg_type", sorted(set(MsgType) - FDS_ALLOWED - {MsgType.CHANNEL}), ids=lambda t: t.name)
def test_descriptors_on_other_types_are_refused(msg_type: MsgType):
    """Only GRANT, ADOPT, RESTORE (and CHANNEL) may carry descriptors; on any other type even one is a violation."""
    raw = protocol.encode(msg_type, valid(msg_type))
    with pytest.raises(ProtocolError, match=f"^{msg_type.name} message carries 1 descriptors, expected 0$"):
        protocol.decode(raw, [42])


@pytest.mark.parametrize("n_fds", [0, 2])
def test_a_channel_carries_exactly_one_descriptor(n_fds: int):
    """CHANNEL's body is empty and its one descriptor is the socket; none, or two, is a violation."""
    raw = protocol.encode(MsgType.CHANNEL, {})
    assert protocol.decode(raw, [7]).fds == [7]
    with pytest.raises(ProtocolError, match=f"^CHANNEL message carries {n_fds} descriptors, expected 1$"):
        protocol.decode(raw, list(range(n_fds)))


GOOD = protocol.encode(MsgType.USAGE, {"used_pages": 3})
GOOD_PAYLOAD = GOOD[HEADER.size :]


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        (b"", "frame of 0 bytes is shorter than the 12-byte header"),
        (GOOD[:11], "frame of 11 bytes is shorter than the 12-byte header"),
        (b"XXXX" + GOOD[4:], "does not start with the kvmem magic"),
        (frame(MsgType.USAGE, GOOD_PAYLOAD, magic=b"kvmm"), "does not start with the kvmem magic"),
        (frame(MsgType.USAGE, GOOD_PAYLOAD, version=2), "protocol version 2 is not supported"),
        (frame(MsgType.USAGE, GOOD_PAYLOAD, version=3), "protocol version 3 is not supported"),
        (frame(MsgType.USAGE, GOOD_PAYLOAD, version=5), "protocol version 5 is not supported"),
        (frame(MsgType.USAGE, GOOD_PAYLOAD, version=0), "protocol version 0 is not supported"),
        (frame(MsgType.USAGE, GOOD_PAYLOAD, length=len(GOOD_PAYLOAD) + 1), "length does not match"),
        (frame(MsgType.USAGE, GOOD_PAYLOAD, length=len(GOOD_PAYLOAD) - 1), "length does not match"),
        (GOOD + b" ", "length does not match"),
        (
            HEADER.pack(MAGIC, PROTOCOL_VERSION, MsgType.USAGE, 1, len(GOOD_PAYLOAD)) + GOOD_PAYLOAD,
            "length does not match",
        ),
        (frame(0, b"{}"), "unknown message type 0"),
        (frame(12, b"{}"), "unknown message type 12"),
        (frame(19, b"{}"), "unknown message type 19"),
        (frame(32, b"{}"), "unknown message type 32"),
        (frame(255, b"{}"), "unknown message type 255"),
        (frame(MsgType.USAGE, b""), "USAGE body is not valid JSON"),
        (frame(MsgType.USAGE, b"{used_pages: 3}"), "USAGE body is not valid JSON"),
        (frame(MsgType.USAGE, b'{"used_pages": 3'), "USAGE body is not valid JSON"),
        (frame(MsgType.USAGE, b'{"used_pages": 3}\xff'), "USAGE body is not valid JSON"),
        (frame(MsgType.USAGE, b'{"used_pages": "\xc3\x28"}'), "USAGE body is not valid JSON"),
        (frame(MsgType.USAGE, b"[" * 50_000), "USAGE body is not valid JSON"),
        (frame(MsgType.USAGE, b'{"used_pages": ' + b"7" * 5000 + b"}"), "USAGE body is not valid JSON"),
        (frame(MsgType.USAGE, b"[1, 2]"), "USAGE body is not a JSON object"),
        (frame(MsgType.USAGE, b'"used_pages"'), "USAGE body is not a JSON object"),
        (frame(MsgType.USAGE, b"3"), "USAGE body is not a JSON object"),
        (frame(MsgType.USAGE, b"null"), "USAGE body is not a JSON object"),
        (frame(MsgType.USAGE, b'{"used_pages": NaN}'), "must be an integer"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_frames_are_protocol_errors(raw: bytes, pattern: str):
    """Broken headers, unknown types and bodies that are not a JSON object are ProtocolErrors, nothing else.

    (A 5000-digit integer exceeds Python's int-conversion limit and used to escape as a bare ValueError.)
    """
    with pytest.raises(ProtocolError, match=pattern):
        protocol.decode(raw, [])


def test_refusals_quote_only_a_bounded_excerpt_of_peer_data():
    """Error text stays short enough to go back in an ERROR message (at most 1024 characters), however long
    the offending key or list item. (Unbounded quotes used to make the daemon's ERROR reply unencodable.)"""
    bodies = [
        (MsgType.HELLO, valid(MsgType.HELLO) | {"k" * 20_000: 1}),
        (MsgType.HELLO, valid(MsgType.HELLO) | {f"extra{i}": i for i in range(2000)}),
        (MsgType.OFFLOAD, {"pages": ["A" * 20_000], "offsets": [0]}),
        (MsgType.OFFLOAD, {"pages": [[0] * 10_000], "offsets": [0]}),
        (MsgType.OFFLOAD, {"pages": [int("9" * 4000)], "offsets": [0]}),
        (MsgType.HELLO, valid(MsgType.HELLO) | {"model": "\x00" * 64}),
    ]
    for msg_type, body in bodies:
        with pytest.raises(ProtocolError) as info:
            protocol.decode(frame(msg_type, json.dumps(body).encode()), [])
        message = str(info.value)
        assert len(message) <= 1024, message[:300]
        protocol.encode(MsgType.ERROR, {"message": message})  # the daemon can always say why


def test_encode_refuses_a_frame_over_max_frame():
    """A body whose JSON makes the frame exceed MAX_FRAME is refused before anything is sent."""
    body = {"req": 1, "ok": True, "error": None, "code": None, "data": ["x" * 1000] * 70}
    with pytest.raises(ProtocolError, match=f"REPLY message of .* bytes exceeds the {MAX_FRAME}-byte frame"):
        protocol.encode(MsgType.REPLY, body)
    fits = {"req": 1, "ok": True, "error": None, "code": None, "data": "y" * (MAX_FRAME - 12 - 72)}
    assert len(protocol.encode(MsgType.REPLY, fits)) <= MAX_FRAME


def test_batched_splits_into_descriptor_sized_chunks():
    """batched() cuts a page list into chunks of at most MAX_FDS_PER_MESSAGE, in order; empty stays one batch."""
    items = list(range(600))
    chunks = protocol.batched(items)
    assert [len(c) for c in chunks] == [253, 253, 94]
    assert [x for c in chunks for x in c] == items
    assert protocol.batched([]) == [[]]


# ---- over real sockets ----


def test_send_and_receive_with_real_descriptors(pair):
    """A GRANT's memfds arrive as new descriptors for the very same files (same inode), in page order."""
    a, b = pair
    sent = memfds(3)
    try:
        for i, fd in enumerate(sent):
            os.pwrite(fd, bytes([0xA0 + i]), 0)
        protocol.send_message(a, MsgType.GRANT, {"req": 8, "pages": [30, 10, 20], "done": True}, sent)
        msg = protocol.receive_message(b)
        try:
            assert msg.type is MsgType.GRANT
            assert msg.body == {"req": 8, "pages": [30, 10, 20], "done": True}
            assert len(msg.fds) == 3
            assert not set(msg.fds) & set(sent)
            for mine, theirs in zip(sent, msg.fds, strict=True):
                assert os.path.samestat(os.fstat(theirs), os.fstat(mine))  # same st_ino and st_dev
            assert [os.pread(fd, 1, 0)[0] for fd in msg.fds] == [0xA0, 0xA1, 0xA2]
        finally:
            protocol.close_fds(msg.fds)
    finally:
        protocol.close_fds(sent)


def test_a_plain_message_round_trips_without_descriptors(pair):
    """Messages without descriptors arrive whole and in order, each as its own datagram."""
    a, b = pair
    for msg_type in (MsgType.HELLO, MsgType.GROW, MsgType.RETURN, MsgType.SLEPT, MsgType.REPLY):
        protocol.send_message(a, msg_type, valid(msg_type))
    for msg_type in (MsgType.HELLO, MsgType.GROW, MsgType.RETURN, MsgType.SLEPT, MsgType.REPLY):
        msg = protocol.receive_message(b)
        assert (msg.type, msg.body, msg.fds) == (msg_type, VALID[msg_type], [])


def test_max_fds_per_message_descriptors_fit_one_message(pair):
    """MAX_FDS_PER_MESSAGE (253) descriptors travel in one GRANT and all arrive, in order."""
    a, b = pair
    sent = memfds(MAX_FDS_PER_MESSAGE, size=0)
    try:
        ids = list(range(MAX_FDS_PER_MESSAGE))
        protocol.send_message(a, MsgType.GRANT, {"req": 1, "pages": ids, "done": True}, sent)
        msg = protocol.receive_message(b)
        try:
            assert msg["pages"] == ids
            assert [os.fstat(fd).st_ino for fd in msg.fds] == [os.fstat(fd).st_ino for fd in sent]
        finally:
            protocol.close_fds(msg.fds)
    finally:
        protocol.close_fds(sent)


def test_more_descriptors_than_the_kernel_allows_fail_on_the_sender(pair):
    """254 descriptors: the kernel refuses the sendmsg with EINVAL (SCM_MAX_FD is 253) and nothing arrives;
    a GRANT/ADOPT of 254 ids is already refused by encode."""
    a, b = pair
    sent = memfds(MAX_FDS_PER_MESSAGE + 1, size=0)
    try:
        with pytest.raises(OSError) as info:
            a.sendmsg([protocol.encode(MsgType.USAGE, {"used_pages": 1})], protocol.ancillary_for(sent))
        assert info.value.errno == errno.EINVAL
        with pytest.raises(ProtocolError, match="a list of at most 253 integers"):
            protocol.send_message(a, MsgType.ADOPT, {"pages": list(range(len(sent)))}, sent)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recvmsg(MAX_FRAME + 1, socket.CMSG_SPACE(4 * 300))
    finally:
        protocol.close_fds(sent)


def test_an_oversized_datagram_is_refused_and_its_descriptors_closed(pair):
    """A datagram over MAX_FRAME is a ProtocolError from receive_frame; descriptors it carried are closed."""
    a, b = pair
    sent = memfds(2)
    try:
        baseline = open_fds()
        a.sendmsg([b"K" * (MAX_FRAME + 1)], protocol.ancillary_for(sent))
        with pytest.raises(ProtocolError, match=f"larger than {MAX_FRAME} bytes"):
            protocol.receive_frame(b)
        assert open_fds() == baseline
        a.send(b"K" * (3 * MAX_FRAME))
        with pytest.raises(ProtocolError, match=f"larger than {MAX_FRAME} bytes"):
            protocol.receive_frame(b)
        # The connection still works for the next (valid) datagram.
        protocol.send_message(a, MsgType.SLEPT, {})
        assert protocol.receive_message(b).type is MsgType.SLEPT
    finally:
        protocol.close_fds(sent)


def test_exactly_max_frame_bytes_is_received_whole(pair):
    """A datagram of exactly MAX_FRAME bytes is not mistaken for an oversized one."""
    a, b = pair
    a.send(b"Z" * MAX_FRAME)
    data, fds = protocol.receive_frame(b)
    assert (len(data), fds) == (MAX_FRAME, [])


def test_a_refused_message_closes_the_descriptors_it_brought(pair):
    """receive_message closes received descriptors when the message is refused (here: fds on a USAGE)."""
    a, b = pair
    sent = memfds(4)
    try:
        baseline = open_fds()
        a.sendmsg([protocol.encode(MsgType.USAGE, {"used_pages": 1})], protocol.ancillary_for(sent))
        with pytest.raises(ProtocolError, match="carries 4 descriptors, expected 0"):
            protocol.receive_message(b)
        assert open_fds() == baseline
    finally:
        protocol.close_fds(sent)


def test_descriptors_the_receiver_has_no_room_for_are_a_protocol_error(pair):
    """At its descriptor limit the receiver gets MSG_CTRUNC: a ProtocolError, and the fds that did arrive
    are closed (none leak)."""
    a, b = pair
    sent = memfds(10)
    try:
        a.sendmsg([protocol.encode(MsgType.USAGE, {"used_pages": 1})], protocol.ancillary_for(sent))
        used = {int(x) for x in os.listdir("/proc/self/fd")}
        # The lowest limit that leaves 3 free descriptor numbers below it (at most max(used) + 4,
        # when the table is dense). The listing's own fd shows as used but is closed again: at
        # most one more free number, still far from room for 10.
        limit = next(n for n in itertools.count() if n - len([u for u in used if u < n]) == 3)
        baseline = open_fds()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))  # room for 3 of the 10
        try:
            with pytest.raises(ProtocolError, match="with too many descriptors"):
                protocol.receive_frame(b)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert open_fds() == baseline
    finally:
        protocol.close_fds(sent)


def test_peer_credentials_of_a_socketpair_are_our_own(pair):
    """SO_PEERCRED gives the (pid, uid, gid) of the process at the other end: here, this one."""
    a, b = pair
    assert protocol.peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())
    assert protocol.peer_credentials(b) == (os.getpid(), os.getuid(), os.getgid())


def test_peer_closing_is_connection_closed(pair):
    """Once the peer closes, receiving raises ConnectionClosed (after any datagrams still queued)."""
    a, b = pair
    protocol.send_message(a, MsgType.WAKE, {"restored": False})
    a.close()
    assert protocol.receive_message(b).type is MsgType.WAKE
    with pytest.raises(ConnectionClosed):
        protocol.receive_message(b)
    with pytest.raises(ConnectionClosed):
        protocol.receive_frame(b)


CHILD = """
import os, socket, sys
from kvmem.common import protocol
from kvmem.common.protocol import MsgType
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.connect(sys.argv[1])
fd = os.memfd_create("from-child")
os.write(fd, b"child-data")
protocol.send_message(sock, MsgType.ADOPT, {"pages": [5]}, [fd])
msg = protocol.receive_message(sock)
assert msg.type is MsgType.ADOPTED, msg
print(os.fstat(fd).st_ino, flush=True)
"""


def test_a_real_child_process_is_identified_and_its_descriptor_usable(tmp_path: Path):
    """Across processes: SO_PEERCRED names the child's pid, its memfd arrives as the same file, and its
    exit reads as ConnectionClosed."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    path = str(tmp_path / "p.sock")
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(30)
    env = os.environ | {"PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE, text=True, env=env)
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            assert protocol.peer_credentials(conn) == (child.pid, os.getuid(), os.getgid())
            msg = protocol.receive_message(conn)
            try:
                assert (msg.type, msg.body, len(msg.fds)) == (MsgType.ADOPT, {"pages": [5]}, 1)
                assert os.pread(msg.fds[0], 10, 0) == b"child-data"
                inode = os.fstat(msg.fds[0]).st_ino
            finally:
                protocol.close_fds(msg.fds)
            protocol.send_message(conn, MsgType.ADOPTED, {"mapping": [[5, 0]], "done": True})
            out, _ = child.communicate(timeout=30)
            assert child.returncode == 0
            assert int(out) == inode
            with pytest.raises(ConnectionClosed):
                protocol.receive_message(conn)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        if child.stdout:
            child.stdout.close()
        listener.close()


@pytest.mark.parametrize("msg_type", [MsgType.OFFLOAD, MsgType.RESTORE], ids=lambda t: t.name)
def test_offsets_must_pair_with_pages(msg_type: MsgType):
    body = {"pages": [1, 2], "offsets": [0]}
    with pytest.raises(ProtocolError, match=f"{msg_type.name} message has 2 pages but 1 offsets"):
        protocol.validate(msg_type, body, 2 if msg_type in FDS_ALLOWED else 0)


@pytest.mark.parametrize(
    ("served", "name"),
    [
        ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),  # valid as it is
        ("/models/Meta-Llama-3-8B-Instruct", "Meta-Llama-3-8B-Instruct"),  # a local path: its last part
        ("my model (v2)", "my-model--v2-"),
        ("日本語モデル", "model-6f7aa479"),  # nothing usable: a digest keeps such names apart
        ("x" * 100, "x" * 55 + "-09ecb6eb"),
    ],
)
def test_an_engines_name_for_its_model_becomes_a_valid_model_name(served: str, name: str):
    assert protocol.model_name_from(served) == name
    assert protocol.check_model_name(name) == name


@pytest.mark.parametrize("bad", ["", "x" * 65, "modèle", "-lead", "a b", "a\nb"])
def test_an_invalid_model_name_is_one_line_naming_the_rule(bad: str):
    with pytest.raises(ValueError) as info:
        protocol.check_model_name(bad)
    assert "\n" not in str(info.value)
    assert str(info.value).endswith(f"is not valid: use {protocol.MODEL_NAME_RULE}")
