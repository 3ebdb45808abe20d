"""`kvmem.common.status`: the status segment in real POSIX shared memory, its permissions, and its seqlock."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import pytest

from kvmem.common.status import (
    LAYOUT_VERSION,
    MAX_SLOTS,
    SEGMENT_SIZE,
    DaemonStatus,
    ModelState,
    ModelStatus,
    StatusError,
    StatusReader,
    StatusWriter,
    as_dict,
)
from tests.support import REPO


def shm_path(name: str) -> Path:
    return Path("/dev/shm") / name.lstrip("/")


def unlink_quietly(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass  # already gone: nothing to clean up


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A segment name no other test or process uses; whatever exists under it afterwards is unlinked."""
    name = f"/kvmem-test.{os.getpid()}.{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        unlink_quietly(name)


# Every field differs from its default and from the others, so a field read from the wrong offset shows.
DAEMON = DaemonStatus(
    daemon_pid=4_000_000_001,
    gpu=-7,
    page_size=2**21 + 17,
    budget_pages=2**40 + 1,
    pages_created=1001,
    pages_free=1002,
    pages_free_clean=1003,
    pages_granted=1004,
    pages_quarantined=1005,
    heartbeat_ns=2**63 + 12345,
    started_unix=1_760_000_000.123456,
    grants=2**64 - 1,
    denies=1006,
    reclaims=1007,
    num_models=3,
    device_kind="cuda",
    device_name="NVIDIA H100 80GB HBM3 — Ünïcode",
    host_tier_used_bytes=2**40 + 3,
    host_tier_capacity_bytes=2**41 + 5,
    sleeps=1008,
    wakes=1009,
    pages_free_dirty=1010,
    pages_created_total=1011,
    pages_released_total=1012,
    pages_scrubbed_total=1013,
    out_of_memory_total=1014,
    host_tier_warm_bytes=2**42 + 7,
    host_tier_saved_bytes_total=2**43 + 9,
    host_tier_restored_bytes_total=2**64 - 4,
    pages_created_for_requests_total=1015,
    reserve_low_pages=1016,
    reserve_high_pages=2**33 + 5,
)
# 32 two-byte characters: exactly the 64 bytes of the slot's name field, with no NUL terminator.
LONGEST_NAME = "é" * 32
MODELS = {
    0: ModelStatus(
        model="模型/llama-3.1-8b@fp8",
        state=ModelState.ASLEEP,
        pid=4_294_967_295,
        uid=1_000_001,
        client_id=77,
        limit_pages=-5,
        min_pages=11,
        priority=-(2**31),
        mapped_pages=12,
        used_pages=13,
        target_pages=-(2**63),
        grants=14,
        denies=15,
        reclaims=16,
        pages_granted_total=2**64 - 2,
        pages_returned_total=17,
        last_grant_us=18,
        saved_pages=19,
        sleeps=20,
        wakes=2**64 - 3,
        waiting_for="24 more pages: 32 of 32 pages exist, 28 granted",
    ),
    5: ModelStatus(
        model=LONGEST_NAME,
        state=ModelState.DRAINING,
        pid=21,
        uid=22,
        client_id=23,
        limit_pages=2**63 - 1,
        min_pages=24,
        priority=2**31 - 1,
        mapped_pages=25,
        used_pages=26,
        target_pages=27,
        grants=28,
        denies=29,
        reclaims=30,
        pages_granted_total=31,
        pages_returned_total=32,
        last_grant_us=33,
        saved_pages=34,
        sleeps=35,
        wakes=36,
        waiting_for="w" * 56,  # the whole field, with no NUL terminator
    ),
    MAX_SLOTS - 1: ModelStatus(model="last-slot", state=ModelState.DETACHED, mapped_pages=99),
}


def slots(models: dict[int, ModelStatus | None]) -> list[ModelStatus | None]:
    out: list[ModelStatus | None] = [None] * MAX_SLOTS
    for i, model in models.items():
        out[i] = model
    return out


def test_the_sample_values_exercise_every_field():
    """Guard for the round-trip test: no field of the samples is left at its default."""
    for obj in (DAEMON, MODELS[0], MODELS[5]):
        for f in dataclasses.fields(obj):
            assert getattr(obj, f.name) != f.default, f"{type(obj).__name__}.{f.name} is at its default"
    assert len(LONGEST_NAME.encode()) == 64


def test_every_field_round_trips(shm_name: str):
    """What the writer publishes, a reader in this process reads back field for field, in slot order."""
    writer = StatusWriter(shm_name)
    try:
        writer.publish(DAEMON, slots(MODELS))
        with StatusReader(shm_name) as reader:
            snap = reader.snapshot()
    finally:
        writer.close()
    assert snap.daemon == DAEMON
    assert snap.models == [MODELS[0], MODELS[5], MODELS[MAX_SLOTS - 1]]
    assert all(type(m.state) is ModelState for m in snap.models)
    assert snap.model(LONGEST_NAME) == MODELS[5]
    assert snap.model("模型/llama-3.1-8b@fp8").pid == 4_294_967_295
    assert snap.model("not-there") is None


def test_a_reader_in_another_process_sees_the_same_image(shm_name: str):
    """The segment is really shared: a separate process reads the published values."""
    writer = StatusWriter(shm_name)
    try:
        writer.publish(DAEMON, slots(MODELS))
        code = (
            "import sys\nfrom kvmem.common.status import StatusReader, as_dict\n"
            "with StatusReader(sys.argv[1]) as r:\n    s = r.snapshot()\n"
            "states = [as_dict(m)['state'] for m in s.models]\n"
            "print(s.daemon.budget_pages, s.daemon.device_name, states, s.models[1].model)"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, shm_name], capture_output=True, text=True, timeout=60, cwd=REPO
        )
    finally:
        writer.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"{2**40 + 1} NVIDIA H100 80GB HBM3 — Ünïcode ['asleep', 'draining', 'detached'] {LONGEST_NAME}"
    )


def test_empty_slots_are_skipped(shm_name: str):
    """None slots and slots whose state is EMPTY do not appear in a snapshot; order follows the slots."""
    writer = StatusWriter(shm_name)
    try:
        models = {
            3: ModelStatus(model="b", state=ModelState.AWAKE),
            7: ModelStatus(model="ghost", state=ModelState.EMPTY, mapped_pages=5),
            9: ModelStatus(model="a", state=ModelState.WAKING),
        }
        writer.publish(DaemonStatus(), slots(models))
        with StatusReader(shm_name) as reader:
            assert [m.model for m in reader.snapshot().models] == ["b", "a"]
            writer.publish(DaemonStatus(), [None] * MAX_SLOTS)
            assert reader.snapshot().models == []
            writer.publish(DaemonStatus(), [])
            assert reader.snapshot().models == []
    finally:
        writer.close()


def test_a_reader_sees_each_new_publication(shm_name: str):
    """A reader mapped once follows later images (no re-open), and the heartbeat age is measured from it."""
    writer = StatusWriter(shm_name)
    try:
        with StatusReader(shm_name) as reader:
            for k in (1, 2, 3):
                writer.publish(DaemonStatus(pages_granted=k, heartbeat_ns=time.monotonic_ns()), [])
                snap = reader.snapshot()
                assert snap.daemon.pages_granted == k
                assert 0 <= snap.heartbeat_age() < 5
    finally:
        writer.close()


def test_more_slots_than_the_layout_has_are_refused(shm_name: str):
    """publish() refuses more than MAX_SLOTS models instead of writing past the segment."""
    writer = StatusWriter(shm_name)
    try:
        with pytest.raises(ValueError, match=f"{MAX_SLOTS + 1} slots exceed the layout's {MAX_SLOTS}"):
            writer.publish(DaemonStatus(), [None] * (MAX_SLOTS + 1))
    finally:
        writer.close()


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_segment_permissions_are_exact_whatever_the_umask(shm_name: str, mode: int):
    """The segment is created with exactly the mode asked for (0600 by default, or 0640), even under a
    umask that would strip group read."""
    old_umask = os.umask(0o077)
    try:
        writer = StatusWriter(shm_name) if mode == 0o600 else StatusWriter(shm_name, mode=mode)
    finally:
        os.umask(old_umask)
    try:
        st = os.stat(shm_path(shm_name))
        assert stat.S_IMODE(st.st_mode) == mode
        assert st.st_uid == os.geteuid()
        assert st.st_size == SEGMENT_SIZE
    finally:
        writer.close()


def test_segment_group_is_set_when_asked(shm_name: str):
    """With gid, the segment belongs to that group (root may give it any group; others their own)."""
    gid = 54321 if os.geteuid() == 0 else os.getgid()
    writer = StatusWriter(shm_name, mode=0o640, gid=gid)
    try:
        st = os.stat(shm_path(shm_name))
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o640)
    finally:
        writer.close()


def test_a_stale_segment_of_the_same_name_is_replaced(shm_name: str):
    """A segment left by a dead daemon (wrong size, junk, loose mode) is unlinked and created afresh."""
    stale = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, mode=0o666, size=4096)
    os.fchmod(stale.fd, 0o666)
    os.write(stale.fd, b"junk" * 100)
    stale_inode = os.fstat(stale.fd).st_ino
    stale.close_fd()
    writer = StatusWriter(shm_name)
    try:
        st = os.stat(shm_path(shm_name))
        assert st.st_ino != stale_inode
        assert (st.st_size, stat.S_IMODE(st.st_mode)) == (SEGMENT_SIZE, 0o600)
        writer.publish(DAEMON, [])
        with StatusReader(shm_name) as reader:
            assert reader.snapshot().daemon == DAEMON
    finally:
        writer.close()


def test_close_unlinks_and_is_idempotent(shm_name: str):
    """close() removes the segment; calling it again is harmless; readers then get a clear StatusError."""
    writer = StatusWriter(shm_name)
    writer.publish(DAEMON, [])
    assert shm_path(shm_name).exists()
    writer.close()
    assert not shm_path(shm_name).exists()
    writer.close()
    writer.close(unlink=True)
    with pytest.raises(StatusError, match="no status segment"):
        StatusReader(shm_name)


def test_close_without_unlink_leaves_the_segment_readable(shm_name: str):
    """close(unlink=False) unmaps only: the last image stays readable (the fixture unlinks it)."""
    writer = StatusWriter(shm_name)
    writer.publish(DAEMON, slots(MODELS))
    writer.close(unlink=False)
    with StatusReader(shm_name) as reader:
        assert reader.snapshot().daemon == DAEMON


def test_a_missing_segment_is_a_clear_status_error(shm_name: str):
    """Opening a segment that does not exist says which one and what to check."""
    with pytest.raises(StatusError) as info:
        StatusReader(shm_name)
    assert str(info.value) == f"no status segment {shm_name}: is kvmemd running for this GPU and runtime dir?"


def test_unreadable_segments_are_status_errors(shm_name: str):
    """A segment that is too small, never published, or of another layout version is refused with a reason."""
    small = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, size=100)
    small.close_fd()
    with pytest.raises(StatusError, match=f"is 100 bytes, expected {SEGMENT_SIZE}"):
        StatusReader(shm_name)
    unlink_quietly(shm_name)

    blank = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, size=SEGMENT_SIZE)  # all zeros: no image yet
    blank.close_fd()
    with StatusReader(shm_name) as reader, pytest.raises(StatusError, match="no kvmem magic"):
        reader.snapshot()
    unlink_quietly(shm_name)

    writer = StatusWriter(shm_name)
    try:
        with StatusReader(shm_name) as reader:
            writer.publish(DAEMON, [])
            assert reader.snapshot().daemon == DAEMON
            writer._map[16:20] = (99).to_bytes(4, "little")  # the layout version field
            with pytest.raises(StatusError, match=f"layout version 99 is not the {LAYOUT_VERSION} this kvmem reads"):
                reader.snapshot()
    finally:
        writer.close()


def test_as_dict_names_states_in_lower_case():
    """as_dict() gives plain values, with the state as its lower-case name."""
    out = as_dict(MODELS[5])
    assert out["state"] == "draining"
    assert out["model"] == LONGEST_NAME
    assert out["limit_pages"] == 2**63 - 1
    assert as_dict(DAEMON)["device_kind"] == "cuda"


# ---- the seqlock, against a writer in another process ----

IMAGES = 5000

TORTURE_WRITER = """
import sys
from kvmem.common.status import MAX_SLOTS, DaemonStatus, ModelState, ModelStatus, StatusWriter

name, count = sys.argv[1], int(sys.argv[2])
INTS = [f.name for f in DaemonStatus.__dataclass_fields__.values() if f.type in ("int", int)]
SLOT_INTS = [f.name for f in ModelStatus.__dataclass_fields__.values() if f.type in ("int", int)]

def image(k):
    daemon = DaemonStatus(**{n: k for n in INTS}, started_unix=float(k), device_kind=str(k), device_name=f"dev-{k}")
    models = [
        ModelStatus(**{n: k for n in SLOT_INTS}, model=f"m{k}-{i}", state=ModelState(1 + k % 5), waiting_for=f"w{k}")
        for i in range(MAX_SLOTS)
    ]
    return daemon, models

writer = StatusWriter(name)
writer.publish(*image(0))
print("ready", flush=True)
sys.stdin.readline()
for k in range(1, count + 1):
    writer.publish(*image(k))
print("done", flush=True)
sys.stdin.readline()
writer.close()
"""


def consistent_k(snap) -> int:
    """The counter of a snapshot, asserting every field of the header and of all slots agrees with it."""
    d = snap.daemon
    k = d.daemon_pid
    header_ints = [getattr(d, f.name) for f in dataclasses.fields(d) if f.type in ("int", int)]
    assert len(header_ints) == 29 and header_ints == [k] * 29, f"torn header: {header_ints}"
    assert (d.started_unix, d.device_kind, d.device_name) == (float(k), str(k), f"dev-{k}")
    assert len(snap.models) == MAX_SLOTS, f"torn image: {len(snap.models)} occupied slots"
    for i, m in enumerate(snap.models):
        slot_ints = [getattr(m, f.name) for f in dataclasses.fields(m) if f.type in ("int", int)]
        assert len(slot_ints) == 18 and slot_ints == [k] * 18, f"torn slot {i} at k={k}: {slot_ints}"
        assert (m.model, m.state, m.waiting_for) == (f"m{k}-{i}", ModelState(1 + k % 5), f"w{k}"), f"torn slot {i}"
    return k


def test_seqlock_snapshots_are_never_torn(shm_name: str):
    """A writer process publishes thousands of images in which every field equals a rising counter k; every
    snapshot this process takes meanwhile is internally consistent and k never goes backwards."""
    writer = subprocess.Popen(
        [sys.executable, "-c", TORTURE_WRITER, shm_name, str(IMAGES)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert writer.stdout.readline() == "ready\n", writer.stderr.read()
        with StatusReader(shm_name) as reader:
            assert consistent_k(reader.snapshot()) == 0
            writer.stdin.write("go\n")
            writer.stdin.flush()
            seen: list[int] = []
            deadline = time.monotonic() + 45
            last = 0
            while last < IMAGES:
                assert time.monotonic() < deadline, f"writer too slow: at k={last}"
                assert writer.poll() is None, f"writer died: {writer.stderr.read()}"
                k = consistent_k(reader.snapshot())
                assert k >= last, f"k went backwards from {last} to {k}"
                last = k
                seen.append(k)
        assert writer.stdout.readline() == "done\n"
        # The reader really ran alongside the writer: it saw many distinct intermediate images.
        distinct = len(set(seen))
        assert distinct >= 100, f"only {distinct} distinct images seen in {len(seen)} snapshots"
        writer.stdin.write("exit\n")
        writer.stdin.flush()
        assert writer.wait(timeout=30) == 0, writer.stderr.read()
        assert not shm_path(shm_name).exists()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(timeout=30)
        for pipe in (writer.stdin, writer.stdout, writer.stderr):
            pipe.close()
