"""The daemon's status in POSIX shared memory: a fixed, versioned layout read without a round trip.

Layout (little-endian; version `LAYOUT_VERSION`): a `HEADER_SIZE`-byte header followed by
`MAX_SLOTS` slots of `SLOT_SIZE` bytes, one per model the daemon knows (attached or with a policy
set). The field order and struct codes are those of `DaemonStatus` / `ModelStatus`, also in
docs/protocol.md.

Concurrency: the daemon is the only writer. It publishes with a seqlock: the 64-bit sequence at
offset 8 is made odd, the whole image is written, then the sequence is made even again. A reader
copies the segment and accepts the copy only if the sequence was even and unchanged around the
copy; it never blocks the writer and never takes a lock. (On x86-64 stores become visible in
program order, which is what the seqlock needs; Python gives no explicit fences.)

Permissions: the segment is created 0600, or 0640 with the daemon's group, and only the daemon
can write it. The name comes from `kvmem.common.runtime.DaemonPaths.shm_name`.
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
import time
from dataclasses import dataclass, field, fields
from typing import Any

import posix_ipc

MAGIC = b"KVMEMST\0"
LAYOUT_VERSION = 5
HEADER_SIZE = 512
SLOT_SIZE = 256
MAX_SLOTS = 64
SEGMENT_SIZE = HEADER_SIZE + MAX_SLOTS * SLOT_SIZE
_SEQ = struct.Struct("<Q")
_SEQ_OFFSET = 8


class ModelState(enum.IntEnum):
    """A model's state as published; `DETACHED` means no engine is connected for it."""

    EMPTY = 0
    AWAKE = 1
    DRAINING = 2
    ASLEEP = 3
    WAKING = 4
    DETACHED = 5


def _laid_out(code: str, default: object) -> Any:
    """A status field, with its struct code in the segment layout (fields are laid out in order)."""
    return field(default=default, metadata={"layout": code})


@dataclass
class DaemonStatus:
    """The header: the daemon and its page pool (fields in layout order)."""

    daemon_pid: int = _laid_out("I", 0)
    gpu: int = _laid_out("i", 0)
    page_size: int = _laid_out("Q", 0)
    budget_pages: int = _laid_out("Q", 0)
    pages_created: int = _laid_out("Q", 0)
    pages_free: int = _laid_out("Q", 0)
    pages_free_clean: int = _laid_out("Q", 0)
    pages_granted: int = _laid_out("Q", 0)
    pages_quarantined: int = _laid_out("Q", 0)
    heartbeat_ns: int = _laid_out("Q", 0)  # time.monotonic_ns() of the last publish
    started_unix: float = _laid_out("d", 0.0)
    grants: int = _laid_out("Q", 0)
    denies: int = _laid_out("Q", 0)
    reclaims: int = _laid_out("Q", 0)
    num_models: int = _laid_out("I", 0)
    device_kind: str = _laid_out("8s", "")  # strings: fixed-size, NUL-padded UTF-8
    device_name: str = _laid_out("64s", "")
    host_tier_used_bytes: int = _laid_out("Q", 0)  # sleeping models' pages kept in host memory
    host_tier_capacity_bytes: int = _laid_out("Q", 0)
    sleeps: int = _laid_out("Q", 0)
    wakes: int = _laid_out("Q", 0)
    pages_free_dirty: int = _laid_out("Q", 0)  # free pages still holding a model's data (zeroed before reuse)
    pages_created_total: int = _laid_out("Q", 0)  # counters since the daemon started
    pages_released_total: int = _laid_out("Q", 0)
    pages_scrubbed_total: int = _laid_out("Q", 0)
    out_of_memory_total: int = _laid_out("Q", 0)  # page creations the driver refused
    host_tier_warm_bytes: int = _laid_out("Q", 0)  # host memory the tier keeps ready beyond what it holds
    host_tier_saved_bytes_total: int = _laid_out("Q", 0)
    host_tier_restored_bytes_total: int = _laid_out("Q", 0)
    # Pages made while a request waited for them (on the grant path), a part of pages_created_total.
    pages_created_for_requests_total: int = _laid_out("Q", 0)
    # The warm reserve's watermarks now (kvmemd.pool: the configured floor, raised for the attached
    # engines' growth unit, their recent GROWs and a first burst still to come): the free pages the
    # daemon refills to and keeps.
    reserve_low_pages: int = _laid_out("Q", 0)
    reserve_high_pages: int = _laid_out("Q", 0)


@dataclass
class ModelStatus:
    """One slot: a model, its engine process and its pages (fields in layout order)."""

    # First in the slot: a reader skips EMPTY slots by it. (`_laid_out` is `field()`: RUF009 misreads it.)
    state: ModelState = _laid_out("I", ModelState.EMPTY)  # noqa: RUF009
    pid: int = _laid_out("I", 0)
    uid: int = _laid_out("I", 0)
    client_id: int = _laid_out("I", 0)
    model: str = _laid_out("64s", "")
    limit_pages: int = _laid_out("q", -1)  # -1: no limit
    min_pages: int = _laid_out("Q", 0)
    priority: int = _laid_out("i", 0)
    mapped_pages: int = _laid_out("Q", 0)  # pages granted to the engine
    used_pages: int = _laid_out("Q", 0)  # pages holding live KV blocks, as the engine reports
    target_pages: int = _laid_out("q", -1)  # what the daemon wants the engine to shrink to; -1: none
    grants: int = _laid_out("Q", 0)
    denies: int = _laid_out("Q", 0)
    reclaims: int = _laid_out("Q", 0)
    pages_granted_total: int = _laid_out("Q", 0)
    pages_returned_total: int = _laid_out("Q", 0)
    last_grant_us: int = _laid_out("Q", 0)
    saved_pages: int = _laid_out("Q", 0)  # pages of this model's cache in the host tier (offloaded sleep)
    sleeps: int = _laid_out("Q", 0)
    wakes: int = _laid_out("Q", 0)
    # Why a wake (a restore from the host tier) still waits; "" when it does not. Clipped to the field.
    waiting_for: str = _laid_out("56s", "")


# (field, struct code) in layout order, read off the dataclasses.
_HEADER_FIELDS = [(f.name, f.metadata["layout"]) for f in fields(DaemonStatus)]
_SLOT_FIELDS = [(f.name, f.metadata["layout"]) for f in fields(ModelStatus)]
# Header: magic, seq, layout version, header size, slot size, max slots, then the fields.
_HEADER = struct.Struct("<8sQIIII" + "".join(code for _, code in _HEADER_FIELDS))
_SLOT = struct.Struct("<" + "".join(code for _, code in _SLOT_FIELDS))
assert _HEADER.size <= HEADER_SIZE and _SLOT.size <= SLOT_SIZE


def _pack_str(value: str, size: int) -> bytes:
    return value.encode()[:size]


def _unpack_str(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


class StatusError(Exception):
    """No status segment, or one this version cannot read."""


class StatusWriter:
    """The daemon's side: creates the segment and publishes images of the status.

    Args:
        name: The segment's name.
        mode: Permission bits (0o600, or 0o640 to let the daemon's group read).
        gid: Group to own the segment, or None.
    """

    def __init__(self, name: str, mode: int = 0o600, gid: int | None = None):
        self.name = name
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=SEGMENT_SIZE)
        except posix_ipc.ExistentialError:
            # Only the daemon holding the lock file gets here, so a segment left behind is stale:
            # its daemon died without unlinking it.
            posix_ipc.unlink_shared_memory(name)
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=SEGMENT_SIZE)
        try:
            os.fchmod(shm.fd, mode)  # shm_open applies the umask; the mode must be exact
            if gid is not None:
                os.fchown(shm.fd, -1, gid)
            self._map = mmap.mmap(shm.fd, SEGMENT_SIZE)
        except OSError:
            shm.close_fd()
            shm.unlink()
            raise
        shm.close_fd()
        self._seq = 0
        self._closed = False
        # A reader may open the segment before the daemon's first real publish: give it a
        # valid image at once (the daemon's pid, nothing else yet).
        self.publish(DaemonStatus(daemon_pid=os.getpid()), [])

    def publish(self, daemon: DaemonStatus, models: list[ModelStatus | None]) -> None:
        """Write one consistent image. `models` has at most MAX_SLOTS entries (None = empty slot)."""
        if len(models) > MAX_SLOTS:
            raise ValueError(f"{len(models)} slots exceed the layout's {MAX_SLOTS}")
        image = bytearray(SEGMENT_SIZE)
        header_values = []
        for name, code in _HEADER_FIELDS:
            value = getattr(daemon, name)
            header_values.append(_pack_str(value, int(code[:-1])) if code.endswith("s") else value)
        _HEADER.pack_into(image, 0, MAGIC, 0, LAYOUT_VERSION, HEADER_SIZE, SLOT_SIZE, MAX_SLOTS, *header_values)
        for i, model in enumerate(models):
            if model is None:
                continue
            values = []
            for name, code in _SLOT_FIELDS:
                value = getattr(model, name)
                values.append(_pack_str(value, int(code[:-1])) if code.endswith("s") else int(value))
            _SLOT.pack_into(image, HEADER_SIZE + i * SLOT_SIZE, *values)
        self._seq += 1  # odd: a write is under way
        _SEQ.pack_into(self._map, _SEQ_OFFSET, self._seq)
        self._map[:_SEQ_OFFSET] = image[:_SEQ_OFFSET]
        self._map[_SEQ_OFFSET + 8 :] = image[_SEQ_OFFSET + 8 :]
        self._seq += 1  # even: the image is whole
        _SEQ.pack_into(self._map, _SEQ_OFFSET, self._seq)

    def close(self, unlink: bool = True) -> None:
        """Unmap and (by default) unlink the segment. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._map.close()
        if unlink:
            try:
                posix_ipc.unlink_shared_memory(self.name)
            except posix_ipc.ExistentialError:
                pass  # already gone: the goal of unlinking is met


@dataclass
class StatusSnapshot:
    daemon: DaemonStatus
    models: list[ModelStatus]  # occupied slots only, by slot order

    def model(self, name: str) -> ModelStatus | None:
        return next((m for m in self.models if m.model == name), None)

    def heartbeat_age(self) -> float:
        """Seconds since the daemon last published."""
        return (time.monotonic_ns() - self.daemon.heartbeat_ns) / 1e9


class StatusReader:
    """A reader's side: maps the segment read-only and takes consistent snapshots."""

    def __init__(self, name: str):
        try:
            shm = posix_ipc.SharedMemory(name, read_only=True)
        except posix_ipc.ExistentialError:
            raise StatusError(f"no status segment {name}: is kvmemd running for this GPU and runtime dir?") from None
        except posix_ipc.PermissionsError:
            raise StatusError(f"no permission to read status segment {name}") from None
        try:
            if shm.size < SEGMENT_SIZE:
                raise StatusError(f"status segment {name} is {shm.size} bytes, expected {SEGMENT_SIZE}")
            self._map = mmap.mmap(shm.fd, SEGMENT_SIZE, prot=mmap.PROT_READ)
        finally:
            shm.close_fd()

    def snapshot(self, retries: int = 10_000) -> StatusSnapshot:
        for _ in range(retries):
            before = _SEQ.unpack_from(self._map, _SEQ_OFFSET)[0]
            if before % 2 == 0:
                image = self._map[:SEGMENT_SIZE]
                if _SEQ.unpack_from(self._map, _SEQ_OFFSET)[0] == before:
                    return _parse(image)
            time.sleep(0)
        raise StatusError("status segment kept changing under the reader")

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> StatusReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(image: bytes) -> StatusSnapshot:
    magic, _seq, version, header_size, slot_size, max_slots, *values = _HEADER.unpack_from(image)
    if magic != MAGIC:
        raise StatusError("status segment has no kvmem magic (not published yet?)")
    if version != LAYOUT_VERSION or header_size != HEADER_SIZE or slot_size != SLOT_SIZE:
        raise StatusError(f"status layout version {version} is not the {LAYOUT_VERSION} this kvmem reads")
    daemon = DaemonStatus()
    for (name, code), value in zip(_HEADER_FIELDS, values, strict=True):
        setattr(daemon, name, _unpack_str(value) if code.endswith("s") else value)
    models = []
    for i in range(max_slots):
        raw = _SLOT.unpack_from(image, HEADER_SIZE + i * SLOT_SIZE)
        if raw[0] == ModelState.EMPTY:
            continue
        model = ModelStatus()
        for (name, code), value in zip(_SLOT_FIELDS, raw, strict=True):
            setattr(model, name, _unpack_str(value) if code.endswith("s") else value)
        model.state = ModelState(model.state)
        models.append(model)
    return StatusSnapshot(daemon, models)


def as_dict(obj: DaemonStatus | ModelStatus) -> dict:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = value.name.lower() if isinstance(value, enum.Enum) else value
    return out
