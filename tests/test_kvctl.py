"""kvctl against a real daemon: through click's runner and as a subprocess; and the metrics endpoint."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import resource
import select
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

import kvmem
from kvmem.cli.doctor import FD_HEADROOM
from kvmem.cli.main import main as kvctl
from tests.daemon_support import DaemonProcess, wait_for
from tests.support import REPO

MiB = 1 << 20
KVCTL = str(REPO / ".venv" / "bin" / "kvctl")
GEOMETRY = {"num_layers": 2, "block_size": 16, "num_kv_heads": 2, "head_dim": 64}  # 4 KiB blocks, 512 a page
SCHEMA = json.loads((REPO / "docs" / "kvctl-status.schema.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def daemon(tmp_path: Path):
    port = free_port()
    extra = ("--reserve", "0", "0", "--metrics-port", str(port), "--node-name", "node-a")
    with DaemonProcess(tmp_path / "rt", "host", "64MiB", *extra) as d:
        d.metrics_port = port
        yield d


def run(daemon: DaemonProcess, *args: str):
    """kvctl through click's runner; stdout and stderr kept apart."""
    return CliRunner().invoke(kvctl, ["--runtime-dir", str(daemon.runtime_dir), *args], catch_exceptions=False)


def run_process(runtime_dir: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [KVCTL, "--runtime-dir", str(runtime_dir), *args], capture_output=True, text=True, timeout=60, **kwargs
    )


def test_status_json_follows_its_schema_and_reports_exact_figures(daemon: DaemonProcess):
    with kvmem.connect("llama-8b", runtime_dir=daemon.runtime_dir) as s:
        cache = s.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
        cache.alloc(700)  # two slots of 4 ranges: 8 pages, both in use
        assert run(daemon, "limit", "qwen-7b", "10MiB").exit_code == 0  # a model known by its policy only
        daemon.wait_for_model("llama-8b", lambda m: m.used_pages == 8, what="usage to be reported")
        result = run(daemon, "status", "--json")
        assert result.exit_code == 0, result.stderr
        doc = json.loads(result.stdout)
        jsonschema.validate(doc, SCHEMA)
        assert doc["schema"] == "kvmem.common.status/1" and doc["daemon"]["budget_bytes"] == 64 * MiB
        llama, qwen = doc["models"]
        assert (llama["model"], llama["state"], llama["pid"]) == ("llama-8b", "awake", os.getpid())
        assert (llama["mapped_bytes"], llama["used_bytes"], llama["limit_bytes"]) == (16 * MiB, 16 * MiB, None)
        assert (qwen["state"], qwen["pid"], qwen["limit_pages"], qwen["limit_bytes"]) == ("detached", None, 5, 10 * MiB)
        assert llama["waiting_for"] == qwen["waiting_for"] == ""

        table = run(daemon, "status").stdout.splitlines()
        assert table[0].startswith("kvmemd pid ") and "budget 64.0 MiB (32 pages)" in table[1]
        header = table[3].split()
        assert header == ["MODEL", "PID", "STATE", "LIMIT", "MIN", "PRIO", "MAPPED", "USED", "TARGET", "SAVED"]
        row = ["llama-8b", str(os.getpid()), "awake", "none", "-", "0", "16.0", "MiB", "16.0", "MiB", "-", "-"]
        assert table[4].split() == row


@pytest.mark.parametrize(
    ("size", "pages"),
    [("20MiB", 10), ("20MB", 9), ("4M", 2), ("25%", 8), ("none", -1)],
    ids=["binary", "decimal", "bare-letter", "percent-of-budget", "none"],
)
def test_limit_sizes_reach_status_and_the_client(daemon: DaemonProcess, size: str, pages: int):
    with kvmem.connect("m", runtime_dir=daemon.runtime_dir) as s:
        client = s.source
        assert run(daemon, "limit", "m", "2MiB").exit_code == 0  # a limit to change from
        wait_for(lambda: client.policy.limit_pages == 1, what="the first policy")
        result = run(daemon, "limit", "m", size)
        assert result.exit_code == 0 and result.stdout == "", result.stderr
        assert daemon.status().model("m").limit_pages == pages  # visible in status once kvctl returns
        wait_for(lambda: client.policy.limit_pages == pages, timeout=2, what="the client to see the limit")


def test_a_lowered_limit_is_acted_on_min_and_priority_show(daemon: DaemonProcess):
    with kvmem.connect("shrinker", runtime_dir=daemon.runtime_dir) as s:
        cache = s.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
        ids = cache.alloc(4 * 512)  # 16 pages
        cache.free(ids[512:])  # three slots empty out; the engine keeps one in use
        assert run(daemon, "limit", "shrinker", "8MiB").exit_code == 0
        daemon.wait_for_model("shrinker", lambda m: m.mapped_pages == 4, what="the cache to shrink to its limit")
        assert run(daemon, "min", "shrinker", "4MiB").exit_code == 0
        assert run(daemon, "priority", "shrinker", "-3").exit_code == 0
        model = daemon.status().model("shrinker")
        assert (model.limit_pages, model.min_pages, model.priority) == (4, 2, -3)


def test_sleep_and_wake_through_the_cli(daemon: DaemonProcess):
    with kvmem.connect("napper", runtime_dir=daemon.runtime_dir) as s:
        s.on_sleep(lambda offload: None)  # a drain hook that frees nothing (see the discarding sleep below)
        cache = s.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
        cache.alloc(100)
        result = run(daemon, "sleep", "napper", "--offload", "--wait")
        assert (result.exit_code, result.stdout, result.stderr) == (0, "", "napper: asleep\n")
        assert daemon.status().model("napper").saved_pages == 4
        result = run(daemon, "wake", "napper", "--wait")
        assert (result.exit_code, result.stderr) == (0, "napper: awake\n")
        wait_for(lambda: not cache.asleep, what="the cache to wake")
        # A discarding sleep cannot finish while the engine keeps its blocks (its drain hook frees
        # none): --wait gives up after --timeout with exit 6 and says what it is stuck on.
        result = run(daemon, "sleep", "napper", "--wait", "--timeout", "0.3")
        assert result.exit_code == 6
        assert result.stderr == "Error: timed out after 0.3 s: model 'napper' is draining (holding 4 pages)\n"


def test_errors_are_one_line_with_documented_exit_codes(daemon: DaemonProcess, tmp_path: Path):
    cases = [
        (["sleep", "ghost"], 5, "Error: no model named 'ghost' is known to this daemon\n"),
        (["wake", "ghost"], 5, "Error: no model named 'ghost' is known to this daemon\n"),
        (
            ["limit", "m", "12XB"],
            2,
            "Error: SIZE: size '12XB' is not understood: use e.g. 20GB, 20GiB, 512M, 1048576 or 25%\n",
        ),
        (["limit", "m", "120%"], 2, "Error: SIZE: size '120%' is more than 100%\n"),
        (
            ["limit", "m", "512K"],
            2,
            "Error: SIZE: 512.0 KiB is less than one 2.0 MiB page, so m could hold nothing: to free its memory, "
            "`kvctl sleep m`\n",
        ),
        (
            ["limit", "m", "-1GB"],
            2,
            "Error: SIZE: size '-1GB' is not understood: use e.g. 20GB, 20GiB, 512M, 1048576 or 25%\n",
        ),
        (["limit", "m"], 2, "Error: Missing argument 'SIZE'.\n"),
        (
            ["sleep", "modèle"],
            2,
            "Error: Invalid value for 'MODEL': model name 'modèle' is not valid: use 1 to 64 ASCII letters, "
            "digits and . _ : / @ + -, starting with a letter or digit\n",
        ),
        (["limit", "--gpu"], 2, "Error: Option '--gpu' requires an argument.\n"),
        (["sleep", "idle-policy-only", "--offload"], 1, None),
    ]
    assert run(daemon, "priority", "idle-policy-only", "1").exit_code == 0
    for args, code, stderr in cases:
        result = run_process(daemon.runtime_dir, *args)
        assert result.returncode == code, (args, result.stderr)
        assert result.stdout == "" and result.stderr.count("\n") == 1, (args, result.stderr)
        if stderr is not None:
            assert result.stderr == stderr
    nowhere = tmp_path / "nowhere"
    for args in (["status"], ["limit", "m", "1G"], ["sleep", "m"], ["top", "--iterations", "1"]):
        result = run_process(nowhere, *args)
        if args[0] == "top":  # top waits for a daemon to appear rather than failing
            assert result.returncode == 0 and "waiting for kvmemd: no kvmemd for GPU 0" in result.stdout
            continue
        assert result.returncode == 3, (args, result.stderr)
        assert result.stderr.startswith(f"Error: no kvmemd for GPU 0 in {nowhere} (no ")
        assert result.stderr.endswith("): start one with `kvmemd start --gpu 0`\n") and result.stderr.count("\n") == 1


def as_user(uid: int, gid: int, work) -> tuple[int, str]:
    """Run `work()` in a forked child with another uid and gid; its exit code and what it reported.

    A fork, not an exec: the child keeps this interpreter (the venv's python may sit in a
    directory other users cannot read) and only drops its credentials. `work` returns
    (exit code, text).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            code, text = work()
            os.write(write_end, text.encode())
        except BaseException as exc:
            os.write(write_end, repr(exc).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        text = reader.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


def kvctl_as(runtime: Path, *args: str):
    def work() -> tuple[int, str]:
        result = CliRunner().invoke(kvctl, ["--runtime-dir", str(runtime), *args])
        return result.exit_code, result.stderr

    return work


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two other users")
def test_not_permitted_is_exit_4_for_the_socket_and_for_another_users_model(tmp_path: Path):
    """A daemon started with --group lets the group's members in; each model stays its owner's."""
    gid = 40000
    # Other users must reach the socket: pytest's own tmp root is 0700, so the daemon lives elsewhere.
    public = Path(tempfile.mkdtemp(prefix="kvmem-perm-"))
    public.chmod(0o755)
    runtime = public / "rt"
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, public, ignore_errors=True)
        daemon = cleanup.enter_context(DaemonProcess(runtime, "host", "64MiB", "--group", str(gid)))
        attached_r, attached_w = os.pipe()
        release_r, release_w = os.pipe()
        owner = os.fork()
        if owner == 0:  # the model's owner, uid 40001: attaches "theirs" and stays until released
            code = 1
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(40001)
                with kvmem.connect("theirs", runtime_dir=runtime):
                    os.write(attached_w, b"ok")
                    os.read(release_r, 1)
                code = 0
            except BaseException as exc:
                os.write(attached_w, repr(exc).encode())
            finally:
                os._exit(code)
        os.close(attached_w)  # so that a child that dies shows as EOF, not a hang
        os.close(release_r)
        try:
            assert os.read(attached_r, 4096) == b"ok"
            code, stderr = as_user(40002, gid, kvctl_as(runtime, "limit", "theirs", "4MiB"))
            assert (code, stderr) == (
                4,
                "Error: not permitted: model 'theirs' belongs to uid 40001, you are uid 40002\n",
            )
            code, stderr = as_user(40003, 40003, kvctl_as(runtime, "sleep", "theirs"))
            assert code == 4 and stderr.startswith("Error: not permitted: ") and stderr.count("\n") == 1, stderr
            # doctor is for exactly this user: it reports (daemon, socket, status) instead of failing itself
            code, stderr = as_user(40003, 40003, kvctl_as(runtime, "doctor"))
            assert code == 1 and stderr.startswith("Error: ") and "check(s) failed: " in stderr, stderr
            assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
            assert daemon.status().model("theirs").limit_pages == -1
        finally:
            os.write(release_w, b"x")
            _, status = os.waitpid(owner, 0)
            os.close(attached_r)
            os.close(release_w)
        assert os.waitstatus_to_exitcode(status) == 0


def test_top_refreshes_in_place_and_quits_on_q(daemon: DaemonProcess):
    with kvmem.connect("watched", runtime_dir=daemon.runtime_dir):
        controller, terminal = pty.openpty()
        proc = subprocess.Popen(
            [KVCTL, "--runtime-dir", str(daemon.runtime_dir), "top", "--interval", "0.1"],
            stdin=terminal, stdout=terminal, stderr=terminal,
        )  # fmt: skip
        os.close(terminal)
        try:
            seen = b""
            deadline = time.monotonic() + 20
            while seen.count(b"watched") < 2 and time.monotonic() < deadline:  # at least two refreshes
                if select.select([controller], [], [], 0.5)[0]:
                    seen += os.read(controller, 65536)
            assert seen.count(b"watched") >= 2 and b"\x1b[?1049h" in seen and b"\x1b[H\x1b[J" in seen
            os.write(controller, b"q")
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(controller)


def test_doctor_passes_with_a_daemon_and_says_how_to_fix_a_missing_one(daemon: DaemonProcess, tmp_path: Path):
    # The fd check wants one descriptor per page of the budget (32) plus 4,096: give this process
    # that much if the hard limit allows, and expect the verdict the limit then deserves.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 32 + FD_HEADROOM
    raised = soft if soft == resource.RLIM_INFINITY or soft >= wanted else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    try:
        result = run(daemon, "doctor", "--json")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    checks = {c["check"]: c for c in json.loads(result.stdout)}
    fd_ok = raised == resource.RLIM_INFINITY or raised >= wanted
    shm_free = shutil.disk_usage("/dev/shm").free
    assert {name: c["status"] for name, c in checks.items()} == {
        "driver": "ok",  # the fake driver, loaded in the test process, is a VMM-capable GPU
        "daemon": "ok",
        "socket": "ok",
        "status": "ok",
        "shm": "ok" if shm_free >= 64 << 20 else "warn",  # CI containers may have a small /dev/shm
        "fd-limit": "ok" if fd_ok else "fail",
    }
    assert result.exit_code == (0 if fd_ok else 1), result.stdout
    missing = run_process(tmp_path / "nowhere", "doctor")
    assert missing.returncode == 1
    assert missing.stderr.startswith("Error: ") and "check(s) failed: daemon, socket, status" in missing.stderr
    lines = missing.stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("FAIL  daemon: no kvmemd for GPU 0"))
    assert lines[i + 1] == "      fix: kvmemd start --gpu 0 --detach (or: systemctl start kvmemd@0)"
    assert any(line.startswith("FAIL  socket: ") for line in lines)


def test_doctor_check_runs_only_the_named_checks_as_the_kubernetes_probes_do(daemon: DaemonProcess, tmp_path: Path):
    """deploy/kubernetes/kvmemd.yaml probes with `kvctl doctor --check ...`: exit 0 while the daemon
    serves, 1 (the named checks failing) once it is gone."""
    probe = ["doctor", "--json", "--check", "daemon", "--check", "socket", "--check", "status"]
    result = run_process(daemon.runtime_dir, *probe)
    assert result.returncode == 0, result.stderr
    assert [(c["check"], c["status"]) for c in json.loads(result.stdout)] == [
        ("daemon", "ok"), ("socket", "ok"), ("status", "ok"),
    ]  # fmt: skip
    daemon.stop()
    result = run_process(daemon.runtime_dir, "doctor", "--check", "daemon")
    assert result.returncode == 1
    assert result.stderr == "Error: 1 check(s) failed: daemon\n"
    assert result.stdout.startswith("FAIL  daemon: no kvmemd for GPU 0")
    result = run_process(daemon.runtime_dir, "doctor", "--check", "gpu")
    assert result.returncode == 2 and "'gpu' is not one of" in result.stderr


def test_metrics_endpoint_is_scraped_and_parsed(daemon: DaemonProcess):
    with kvmem.connect("scraped", runtime_dir=daemon.runtime_dir) as s:
        cache = s.kv_cache(**GEOMETRY, max_tokens=16 * 20_000, low_watermark=0, high_watermark=0)
        cache.alloc(700)
        assert run(daemon, "limit", "scraped", "32MiB").exit_code == 0
        # (The limit and the reserve it caps are published together: read after both are.)
        daemon.wait_for_model("scraped", lambda m: m.used_pages == 8 and m.limit_pages == 16, what="usage, limit")
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        head = daemon.status().daemon  # the reserve's watermarks as the status says them, the engine still attached
    samples = {}
    # Every series names its daemon: a host daemon's gpu_uuid is "host", gpu its --gpu, node its --node-name.
    fleet = {"gpu": "0", "gpu_uuid": "host", "node": "node-a"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert {k: sample.labels.get(k) for k in fleet} == fleet, sample
            own = {k: v for k, v in sample.labels.items() if k not in fleet and k != "le"}
            samples[sample.name, tuple(sorted(own.items()))] = sample.value
    model = (("model", "scraped"),)
    assert samples["kvmem_budget_bytes", ()] == 64 * MiB
    assert samples["kvmem_pages", (("state", "granted"),)] == 8
    assert samples["kvmem_reserve_pages", (("bound", "low"),)] == head.reserve_low_pages > 0
    assert samples["kvmem_reserve_pages", (("bound", "high"),)] == head.reserve_high_pages
    assert samples["kvmem_model_mapped_bytes", model] == 16 * MiB
    assert samples["kvmem_model_used_bytes", model] == 16 * MiB
    assert samples["kvmem_model_limit_bytes", model] == 32 * MiB
    assert samples["kvmem_model_state", (("model", "scraped"), ("state", "awake"))] == 1
    assert samples["kvmem_model_state", (("model", "scraped"), ("state", "asleep"))] == 0
    assert samples["kvmem_grants_total", ()] >= 1 and samples["kvmem_model_grants_total", model] >= 1
    assert samples["kvmem_grant_latency_seconds_count", ()] == samples["kvmem_grants_total", ()]


def test_limit_says_what_it_set_and_whether_the_model_is_attached(daemon: DaemonProcess):
    result = run_process(daemon.runtime_dir, "limit", "typo-model", "5MiB")
    assert result.returncode == 0
    assert result.stderr == (
        "typo-model: limit 4.0 MiB (2 pages)\n"
        "note: typo-model is not attached; the policy applies when an engine attaches it "
        "(`kvctl forget typo-model` drops it)\n"
    )
    result = run_process(daemon.runtime_dir, "min", "typo-model", "3MiB")
    assert result.stderr.splitlines()[0] == "typo-model: minimum 4.0 MiB (2 pages)"
    with kvmem.connect("attached-model", runtime_dir=daemon.runtime_dir):
        result = run_process(daemon.runtime_dir, "limit", "attached-model", "1GiB", "--gpu", "0")  # options after
        assert result.returncode == 0
        assert result.stderr == (
            "attached-model: limit 1.0 GiB (512 pages)\nnote: that is more than the daemon's whole budget, 64.0 MiB\n"
        )


def test_forget_drops_a_detached_policy_and_only_that(daemon: DaemonProcess):
    assert run_process(daemon.runtime_dir, "limit", "typo", "4MiB").returncode == 0
    assert daemon.status().model("typo") is not None
    result = run_process(daemon.runtime_dir, "forget", "typo")
    assert (result.returncode, result.stderr) == (0, "typo: forgotten\n")
    wait_for(lambda: daemon.status().model("typo") is None, what="the slot to clear")
    result = run_process(daemon.runtime_dir, "forget", "typo")
    assert (result.returncode, result.stderr) == (5, "Error: no model named 'typo' is known to this daemon\n")
    with kvmem.connect("busy", runtime_dir=daemon.runtime_dir):
        result = run_process(daemon.runtime_dir, "forget", "busy")
        assert result.returncode == 1
        assert result.stderr.startswith("Error: model 'busy' is attached by pid ")
