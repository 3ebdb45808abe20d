"""The wire protocol between kvmemd and its clients (engines and kvctl). Spec: docs/protocol.md.

Transport: a Unix ``SOCK_SEQPACKET`` socket, so every message is one datagram and the kernel keeps
the boundaries; page file descriptors travel with a message as SCM_RIGHTS ancillary data.

Frame: a 12-byte header (magic ``KVMM``, protocol version, message type, zero, body length; network
byte order) and a body, at most `MAX_FRAME` bytes in all. Nothing is ever unpickled. Each message
type has a schema: the body must have exactly the listed fields with the listed types and bounds
(a bool is not an int), and only the types listed in `FDS_ALLOWED` may carry descriptors, one per
page id. Anything else is a `ProtocolError`, which costs the sender its connection and nothing more.

Bodies are UTF-8 JSON objects, except for the three messages of the grant path (`PACKED`: GROW,
GRANT, RETURN), whose bodies are fixed big-endian layouts of unsigned 32-bit integers. A grant's
round trip encodes and decodes four of them; as JSON with its schema checks each cost about 10 µs
in CPython, as a struct about 1 µs (measured on this project's 2-core machines; see
benchmarks/README.md). Decoded, a packed body is the same dict of fields as its schema, checked
against the same bounds.
"""

from __future__ import annotations

import array
import enum
import hashlib
import json
import os
import re
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvmem.common.errors import ConnectionClosed, DaemonRefusedError, ProtocolError

PROTOCOL_VERSION = 4  # 3: WELCOME names the daemon's GPU by UUID; 4: HELLO says whether the engine sleeps
MAGIC = b"KVMM"
HEADER = struct.Struct("!4sBBHI")
MAX_FRAME = 64 * 1024
# Linux accepts at most SCM_MAX_FD (253) descriptors in one SCM_RIGHTS message (include/net/scm.h).
MAX_FDS_PER_MESSAGE = 253
MAX_PAGES_PER_REQUEST = 1 << 20
MAX_RETURN_IDS = 4096  # page ids per RETURN message; fits a frame with room to spare
MAX_OFFLOAD_IDS = 1024  # (page id, offset) pairs per OFFLOAD message; fits a frame with room to spare
MAX_OFFSET = 2**52  # byte offsets of pages in an engine's reservation
# The most growth units (slots of an engine's KV layout) a kvmem cache maps in one growth: its
# first burst of requests asks for up to that many at once (kvmem.cache.growth), and the daemon
# keeps that many made for an engine that has not grown by more than one yet (kvmemd.sessions).
MAX_BURST_SLOTS = 16
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,63}$")
MODEL_NAME_RULE = "1 to 64 ASCII letters, digits and . _ : / @ + -, starting with a letter or digit"
_FD_SIZE = array.array("i").itemsize


def _excerpt(value: Any, limit: int = 64) -> str:
    """`repr(value)` cut to `limit` characters: errors quote the peer's data, but only so much of it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MsgType(enum.IntEnum):
    # client -> daemon
    HELLO = 1
    GROW = 2
    RETURN = 3
    USAGE = 4
    ADOPT = 5
    CONTROL = 6
    SLEPT = 7
    OFFLOAD = 8
    LAYOUT = 9
    CHANNEL = 10
    DRAIN = 11
    # daemon -> client
    WELCOME = 20
    GRANT = 21
    DENY = 22
    RECLAIM = 23
    POLICY = 24
    SLEEP = 25
    WAKE = 26
    ADOPTED = 27
    REPLY = 28
    ERROR = 29
    GOODBYE = 30
    RESTORE = 31


# ---- schemas ----


@dataclass(frozen=True)
class Int:
    lo: int
    hi: int

    def check(self, name: str, value: Any) -> None:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise ProtocolError(f"field {name!r} must be an integer in [{self.lo}, {self.hi}]")


@dataclass(frozen=True)
class Str:
    max_len: int
    pattern: re.Pattern | None = None
    choices: tuple[str, ...] | None = None

    def check(self, name: str, value: Any) -> None:
        if type(value) is not str or len(value) > self.max_len:
            raise ProtocolError(f"field {name!r} must be a string of at most {self.max_len} characters")
        if self.pattern is not None and not self.pattern.match(value):
            raise ProtocolError(f"field {name!r} has an invalid value {value[:64]!r}")
        if self.choices is not None and value not in self.choices:
            raise ProtocolError(f"field {name!r} must be one of {', '.join(self.choices)}")


@dataclass(frozen=True)
class Bool:
    def check(self, name: str, value: Any) -> None:
        if type(value) is not bool:
            raise ProtocolError(f"field {name!r} must be a boolean")


@dataclass(frozen=True)
class IntList:
    max_len: int
    lo: int = 0
    hi: int = 2**31 - 1

    def check(self, name: str, value: Any) -> None:
        if type(value) is not list or len(value) > self.max_len:
            raise ProtocolError(f"field {name!r} must be a list of at most {self.max_len} integers")
        # The common case with C-level builtins only (grants name hundreds of ids); the loop below
        # runs only to name the offending item.
        if not value or (set(map(type, value)) == _INT_ONLY and self.lo <= min(value) and max(value) <= self.hi):
            return
        for item in value:
            if type(item) is not int or not self.lo <= item <= self.hi:
                raise ProtocolError(f"field {name!r} holds {_excerpt(item)}, not an integer in [{self.lo}, {self.hi}]")


@dataclass(frozen=True)
class Pairs:
    """A list of [int, int] pairs."""

    max_len: int

    def check(self, name: str, value: Any) -> None:
        if type(value) is not list or len(value) > self.max_len:
            raise ProtocolError(f"field {name!r} must be a list of at most {self.max_len} pairs")
        for pair in value:
            if type(pair) is not list or len(pair) != 2 or any(type(x) is not int or x < 0 for x in pair):
                raise ProtocolError(f"field {name!r} must hold [int, int] pairs of non-negative integers")


@dataclass(frozen=True)
class Json:
    """Any JSON value nested at most `max_depth` deep (the frame bound limits its size)."""

    max_depth: int = 6

    def check(self, name: str, value: Any, depth: int = 0) -> None:
        if depth > self.max_depth:
            raise ProtocolError(f"field {name!r} is nested deeper than {self.max_depth}")
        if isinstance(value, dict):
            for item in value.values():
                self.check(name, item, depth + 1)
        elif isinstance(value, list):
            for item in value:
                self.check(name, item, depth + 1)
        elif value is not None and type(value) not in (int, float, str, bool):
            raise ProtocolError(f"field {name!r} holds a {type(value).__name__}")


@dataclass(frozen=True)
class Optional:
    inner: Any

    def check(self, name: str, value: Any) -> None:
        if value is not None:
            self.inner.check(name, value)


_INT_ONLY = {int}
_TEXT = Str(1024)
_REQ = Int(1, 2**31 - 1)
_COUNT = Int(0, 2**40)
_MODEL = Str(64, MODEL_NAME)
_PAGE_IDS = IntList(MAX_FDS_PER_MESSAGE)

CONTROL_OPS = ("set_limit", "set_min", "set_priority", "sleep", "wake", "status", "forget")
# Why a control request failed, so that kvctl can map it to an exit code without reading prose.
CONTROL_ERROR_CODES = ("invalid", "unknown_model", "not_permitted", "conflict", "no_room")
DENY_REASONS = ("limit", "budget", "asleep", "shutdown")
RECLAIM_REASONS = ("pressure",)  # a lowered limit is a POLICY, never a RECLAIM

SCHEMAS: dict[MsgType, dict[str, Any]] = {
    MsgType.HELLO: {
        "version": Int(0, 255),
        "role": Str(16, choices=("engine", "control")),
        "model": Optional(_MODEL),
        # The engine sleeps (it said SLEPT and no WAKE came since): after a daemon restart the new
        # daemon records it asleep, with nothing saved, instead of taking it for awake.
        "asleep": Bool(),
        "adopt": Int(0, MAX_PAGES_PER_REQUEST),
        "page_size": Int(0, 2**40),
    },
    MsgType.GROW: {"req": _REQ, "pages": Int(1, MAX_PAGES_PER_REQUEST), "wait_ms": Int(0, 600_000)},
    MsgType.RETURN: {"pages": IntList(MAX_RETURN_IDS)},
    MsgType.USAGE: {"used_pages": _COUNT},
    MsgType.ADOPT: {"pages": _PAGE_IDS},
    MsgType.CONTROL: {
        "req": _REQ,
        "op": Str(16, choices=CONTROL_OPS),
        "model": Optional(_MODEL),
        "value": Optional(Int(-(2**62), 2**62)),
    },
    MsgType.SLEPT: {},
    # Give pages back and keep their contents in the host tier, each for the byte offset the
    # engine mapped it at; RESTORE hands them back with the same offsets on wake.
    MsgType.OFFLOAD: {"pages": IntList(MAX_OFFLOAD_IDS), "offsets": IntList(MAX_OFFLOAD_IDS, hi=MAX_OFFSET)},
    # The engine's KV layout descriptor (`kvmem.common.layout.KVLayout.to_dict()`), checked by the daemon.
    MsgType.LAYOUT: {"layout": Json(max_depth=2)},
    # The engine's grant channel: one end of a socketpair, as the message's one descriptor.
    MsgType.CHANNEL: {},
    MsgType.DRAIN: {"hook": Bool()},
    MsgType.WELCOME: {
        "version": Int(0, 255),
        "client_id": _COUNT,
        "slot": Int(-1, 4096),
        "page_size": Int(1, 2**40),
        "device_kind": Str(16),
        "device_ordinal": Int(0, 1024),
        "device_uuid": Optional(Str(64)),
        "budget_pages": _COUNT,
    },
    MsgType.GRANT: {"req": _REQ, "pages": _PAGE_IDS, "done": Bool()},
    MsgType.DENY: {"req": _REQ, "reason": Str(16, choices=DENY_REASONS), "detail": _TEXT, "granted": _COUNT},
    MsgType.RECLAIM: {"pages": _COUNT, "deadline_ms": Int(0, 600_000), "reason": Str(16, choices=RECLAIM_REASONS)},
    MsgType.POLICY: {
        "limit_pages": Int(-1, 2**40),
        "min_pages": _COUNT,
        "priority": Int(-(2**31), 2**31 - 1),
        "target_pages": Int(-1, 2**40),
    },
    MsgType.SLEEP: {"offload": Bool()},
    MsgType.WAKE: {"restored": Bool()},
    MsgType.ADOPTED: {"mapping": Pairs(MAX_FDS_PER_MESSAGE), "done": Bool()},
    MsgType.REPLY: {
        "req": _REQ,
        "ok": Bool(),
        "error": Optional(_TEXT),
        "code": Optional(Str(16, choices=CONTROL_ERROR_CODES)),
        "data": Json(),
    },
    MsgType.ERROR: {"message": _TEXT},
    MsgType.GOODBYE: {"reason": _TEXT},
    # Pages restored from the host tier, each to be mapped at its offset; WAKE follows the last.
    MsgType.RESTORE: {"pages": _PAGE_IDS, "offsets": IntList(MAX_FDS_PER_MESSAGE, hi=MAX_OFFSET)},
}

# Lookups by plain dict: calling the enum (MsgType(n)) costs a few microseconds on every frame.
_TYPES_BY_NUMBER = {int(t): t for t in MsgType}

# The messages that carry page descriptors: one per page id, in order. (CHANNEL carries one
# descriptor too, a socket; no other message carries any.)
FDS_ALLOWED = {MsgType.GRANT, MsgType.ADOPT, MsgType.RESTORE}
# Messages whose "offsets" pair up with their "pages", one each.
_PAIRED_OFFSETS = {MsgType.OFFLOAD, MsgType.RESTORE}

# The grant path's packed bodies (docs/protocol.md, "Packed bodies"). Page ids follow the fixed
# part as u32s, as many as the body's length leaves room for.
PACKED = frozenset({MsgType.GROW, MsgType.GRANT, MsgType.RETURN})
_GROW_BODY = struct.Struct("!III")  # req, pages, wait_ms
_GRANT_HEAD = struct.Struct("!II")  # req, flags; then one page id per descriptor
_GRANT_DONE = 0x1  # flags: the request is fully served (the only flag)
_FIXED_SIZE = {MsgType.GROW: _GROW_BODY.size, MsgType.GRANT: _GRANT_HEAD.size, MsgType.RETURN: 0}


@dataclass
class Message:
    type: MsgType
    body: dict[str, Any]
    fds: list[int] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.body[key]


def check_model_name(name: str) -> str:
    """`name` if a daemon accepts it as a model name.

    Raises:
        ValueError: One line naming the name and the rule.
    """
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise ValueError(f"model name {_excerpt(name)} is not valid: use {MODEL_NAME_RULE}")
    return name


def model_name_from(text: str) -> str:
    """A valid model name made from an engine's own name for its model (vLLM's served model name,
    often a local path): `text` itself when valid; else its last path component with other
    characters as ``-``, cut to 55 characters plus ``-`` and 8 hex digits of the SHA-256 of `text`
    when too long (or ``model-`` and the digits when nothing is left), so that names stay apart."""
    if MODEL_NAME.match(text):
        return text
    digest = hashlib.sha256(text.encode(errors="surrogatepass")).hexdigest()[:8]
    base = text.rstrip("/").rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._:@+-]", "-", base).lstrip("._:@+-")
    if not cleaned.strip("-"):
        return f"model-{digest}"
    return cleaned if len(cleaned) <= 64 else f"{cleaned[:55]}-{digest}"


def descriptor_count(msg_type: MsgType, body: Mapping[str, Any]) -> int:
    """How many descriptors a (schema-valid) message of this type carries."""
    if msg_type in FDS_ALLOWED:
        return len(body["pages"])  # one per page id
    return 1 if msg_type == MsgType.CHANNEL else 0  # the channel's socket


def validate(msg_type: MsgType, body: Mapping[str, Any], num_fds: int) -> None:
    """Check `body` against the schema of `msg_type`; raise ProtocolError naming the problem."""
    schema = SCHEMAS[msg_type]
    if body.keys() != schema.keys():
        missing = schema.keys() - body.keys()
        extra = body.keys() - schema.keys()
        problem = f"missing {sorted(missing)}" if missing else f"unknown {_excerpt(sorted(extra))}"
        raise ProtocolError(f"{msg_type.name} message has {problem} fields")
    for name, checker in schema.items():
        checker.check(name, body[name])
    if msg_type in _PAIRED_OFFSETS and len(body["offsets"]) != len(body["pages"]):
        pages, offsets = len(body["pages"]), len(body["offsets"])
        raise ProtocolError(f"{msg_type.name} message has {pages} pages but {offsets} offsets")
    expected_fds = descriptor_count(msg_type, body)
    if num_fds != expected_fds:
        raise ProtocolError(f"{msg_type.name} message carries {num_fds} descriptors, expected {expected_fds}")


def encode(msg_type: MsgType, body: Mapping[str, Any]) -> bytes:
    """One frame: header + body. Validates the body first (never send what we would refuse)."""
    try:
        num_fds = descriptor_count(msg_type, body)  # as the sender will attach them
    except (KeyError, TypeError):
        num_fds = 0  # no "pages" list to count: validate says what is wrong with it
    validate(msg_type, body, num_fds)
    payload = _pack(msg_type, body) if msg_type in PACKED else json.dumps(body, separators=(",", ":")).encode()
    if HEADER.size + len(payload) > MAX_FRAME:
        raise ProtocolError(f"{msg_type.name} message of {len(payload)} bytes exceeds the {MAX_FRAME}-byte frame")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, msg_type, 0, len(payload)) + payload


def _pack(msg_type: MsgType, body: Mapping[str, Any]) -> bytes:
    """The packed body of a validated GROW, GRANT or RETURN."""
    if msg_type == MsgType.GROW:
        return _GROW_BODY.pack(body["req"], body["pages"], body["wait_ms"])
    ids = body["pages"]
    ids_bytes = struct.pack(f"!{len(ids)}I", *ids)
    if msg_type == MsgType.GRANT:
        return _GRANT_HEAD.pack(body["req"], _GRANT_DONE if body["done"] else 0) + ids_bytes
    return ids_bytes


def _unpack(msg_type: MsgType, payload: bytes) -> dict[str, Any]:
    """The fields of a packed body (not yet checked against the schema's bounds)."""
    fixed = _FIXED_SIZE[msg_type]
    if len(payload) < fixed or (len(payload) - fixed) % 4:
        what = f"{fixed} bytes" if msg_type == MsgType.GROW else f"{fixed} bytes and 4 per page id"
        raise ProtocolError(f"{msg_type.name} body of {len(payload)} bytes does not have the packed layout ({what})")
    if msg_type == MsgType.GROW:
        if len(payload) != fixed:
            raise ProtocolError(f"GROW body of {len(payload)} bytes does not have the packed layout ({fixed} bytes)")
        req, pages, wait_ms = _GROW_BODY.unpack(payload)
        return {"req": req, "pages": pages, "wait_ms": wait_ms}
    ids = list(struct.unpack_from(f"!{(len(payload) - fixed) // 4}I", payload, fixed))
    if msg_type == MsgType.RETURN:
        return {"pages": ids}
    req, flags = _GRANT_HEAD.unpack_from(payload)
    if flags & ~_GRANT_DONE:
        raise ProtocolError(f"GRANT has unknown flags {flags:#x}")
    return {"req": req, "pages": ids, "done": bool(flags & _GRANT_DONE)}


def decode(frame: bytes, fds: Sequence[int]) -> Message:
    """Parse and validate one received frame. The caller closes `fds` if this raises."""
    if len(frame) < HEADER.size:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, raw_type, zero, length = HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError("frame does not start with the kvmem magic")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})")
    if zero != 0 or length != len(frame) - HEADER.size:
        raise ProtocolError("frame length does not match its header")
    msg_type = _TYPES_BY_NUMBER.get(raw_type)
    if msg_type is None:
        raise ProtocolError(f"unknown message type {raw_type}")
    if msg_type in PACKED:
        body = _unpack(msg_type, frame[HEADER.size :])
    else:
        try:
            body = json.loads(frame[HEADER.size :].decode())
        # ValueError covers JSONDecodeError, UnicodeDecodeError and an integer over Python's digit limit.
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"{msg_type.name} body is not valid JSON: {exc}") from None
        if type(body) is not dict:
            raise ProtocolError(f"{msg_type.name} body is not a JSON object")
    validate(msg_type, body, len(fds))
    return Message(msg_type, body, list(fds))


# ---- socket helpers ----


def ancillary_for(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def send_message(sock: socket.socket, msg_type: MsgType, body: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message (blocking). The caller keeps ownership of `fds`."""
    sock.sendmsg([encode(msg_type, body)], ancillary_for(fds))


_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)
# As a plain int: socket's MSG_* are IntFlag members, and flag arithmetic on them costs microseconds.
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)


def receive_frame(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Receive one datagram and its descriptors.

    Raises:
        ConnectionClosed: The peer closed the connection.
        ProtocolError: The datagram or its descriptors were truncated (oversized); descriptors
            that did arrive are closed.
    """
    data, ancdata, flags, _ = sock.recvmsg(MAX_FRAME + 1, _CMSG_SPACE)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return check_received(data, fds, flags)


def check_received(data: bytes, fds: list[int], flags: int) -> tuple[bytes, list[int]]:
    """One received datagram (`recvmsg` of `MAX_FRAME` + 1 bytes): the frame and its descriptors.

    Raises:
        ConnectionClosed, ProtocolError: As `receive_frame`.
    """
    if not data and not fds:
        raise ConnectionClosed("peer closed the connection")
    if flags & _TRUNCATED or len(data) > MAX_FRAME:
        close_fds(fds)
        raise ProtocolError(f"message larger than {MAX_FRAME} bytes or with too many descriptors")
    return data, fds


def receive_message(sock: socket.socket) -> Message:
    """Receive and validate one message (blocking)."""
    data, fds = receive_frame(sock)
    try:
        return decode(data, fds)
    except ProtocolError:
        close_fds(fds)
        raise


def receive_expected(sock: socket.socket, msg_type: MsgType) -> Message:
    """The next message on a blocking `sock`, which must be of `msg_type`.

    Raises:
        DaemonRefusedError: The daemon sent ERROR instead (its text says why).
        ProtocolError: Another message came.
    """
    msg = receive_message(sock)
    if msg.type == MsgType.ERROR:
        raise DaemonRefusedError(f"kvmemd refused: {msg['message']}")
    if msg.type != msg_type:
        close_fds(msg.fds)
        raise ProtocolError(f"expected {msg_type.name} from kvmemd, got {msg.type.name}")
    return msg


def close_fds(fds: Sequence[int]) -> None:
    """Close descriptors received or handed over and not kept (each at most once; a closed one is skipped)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass  # already closed: nothing left to release


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from SO_PEERCRED (set by the kernel)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def batched(items: Sequence[int], size: int = MAX_FDS_PER_MESSAGE) -> list[Sequence[int]]:
    """`items` in consecutive chunks of at most `size` (descriptor batches)."""
    return [items[i : i + size] for i in range(0, len(items), size)] or [items[:0]]
