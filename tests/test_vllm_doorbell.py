"""The vLLM scheduler's doorbell (kvmem.integrations.vllm.doorbell) against a real daemon and a real
engine process: it reads the same while pages move, and changes with every wish the daemon sends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import kvmem
from kvmem.common.status import ModelState
from kvmem.control import ControlClient
from kvmem.integrations.vllm.doorbell import DaemonDoorbell, status_entry
from tests.daemon_support import DaemonProcess, EngineProcess, wait_for

MiB = 1 << 20
PAGE = 2 * MiB


def test_the_doorbell_changes_with_each_daemon_wish_and_not_with_pages(tmp_path: Path):
    runtime = tmp_path / "rt"
    with (
        DaemonProcess(runtime, "host", "16MiB", "--reserve", "0", "0") as daemon,  # 8 pages
        EngineProcess(runtime, "watched", "--auto-return", "--sleep-returns") as watched,
        EngineProcess(runtime, "other") as other,
        ControlClient(runtime_dir=runtime) as control,
    ):
        doorbell = DaemonDoorbell()
        # Rank 0 is the watched engine (found by its pid); rank 1 has no daemon (a local budget).
        doorbell.watch([{"segment": daemon.paths.shm_name, "pid": watched.pid}, None])
        first = doorbell.read()
        assert first[1] is None and first[0][2] == ModelState.AWAKE

        assert watched.call("grow", 8)["granted"] == 8
        watched.call("map")
        daemon.wait_for_model("watched", lambda m: m.mapped_pages == 8, what="the grant to be published")
        assert doorbell.read() == first  # pages moved; the daemon wished nothing

        readings = [first]

        def changed(what: str) -> tuple:
            wait_for(lambda: doorbell.read() != readings[-1], what=f"the doorbell to show {what}")
            readings.append(doorbell.read())
            return readings[-1][0]

        assert other.call("grow", 2, 5)["granted"] == 2  # the budget is spent: the daemon reclaims
        assert changed("a reclaim")[5] >= 1
        control.set_limit("watched", 3 * PAGE)
        assert changed("a limit")[3] == 3
        control.sleep("watched")
        assert changed("a sleep")[2] in (ModelState.DRAINING, ModelState.ASLEEP)
        daemon.wait_for_model("watched", lambda m: m.state == ModelState.ASLEEP, what="asleep")
        control.wake("watched")
        wait_for(lambda: doorbell.read()[0][2] == ModelState.AWAKE, what="the doorbell to show the wake")

        # The daemon restarts: unreadable meanwhile, then the new daemon's entry for the engine.
        daemon.stop()
        assert doorbell.read()[0] == "missing"
        daemon.start()
        wait_for(lambda: doorbell.read()[0] not in ("missing", readings[-1][0]), what="the new daemon's entry")
        assert doorbell.read()[0][0] != first[0][0]  # another daemon process


@pytest.mark.parametrize("reply", [{"segment": "/x"}, {"segment": 1, "pid": 2}, {"segment": "/x", "pid": True}, [1]])
def test_a_malformed_status_entry_from_a_rank_is_refused(reply):
    with pytest.raises(ValueError, match="a rank reported its status entry"):
        DaemonDoorbell().watch([reply])


def test_a_session_names_the_status_segment_its_daemon_publishes_it_in(tmp_path: Path):
    with (
        DaemonProcess(tmp_path / "rt", "host", "16MiB") as daemon,
        kvmem.connect("named", runtime_dir=daemon.runtime_dir) as s,
    ):
        assert s.status_segment == daemon.paths.shm_name
        assert status_entry(s.status_segment) == {"segment": daemon.paths.shm_name, "pid": os.getpid()}
    with kvmem.local(device="host", budget="8MiB") as local:
        assert local.status_segment is None and status_entry(local.status_segment) is None
