"""`make gpu-check` without a GPU, its report on the fake driver, the benchmarks' per-call costs, and the
size check of the wheels that travel to the GPU machine. No GPU needed, nothing timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import costs
from tests.support import REPO, real_driver_env

PARTS = ("pytest -m gpu", "benchmarks/bench_driver.py", "benchmarks/bench_kernels.py")


def gpu_check(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_make_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path: Path):
    out = tmp_path / "out"
    env = {**real_driver_env(), "PYTHON": sys.executable}
    result = subprocess.run(
        ["make", "-s", "gpu-check", f"OUT={out}"], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert len(result.stdout.splitlines()) == 1
    assert result.stdout.startswith("gpu-check: no GPU here (no CUDA driver: libcuda.so.1 does not load)")
    assert all(part in result.stdout for part in PARTS)
    assert not out.exists()


def test_the_fake_driver_is_not_taken_for_a_gpu(tmp_path: Path):
    result = gpu_check("--out", str(tmp_path / "out"), env=os.environ.copy())  # the fake is on LD_LIBRARY_PATH
    assert result.returncode == 0, result.stderr
    assert "libcuda.so.1 here is kvmem's fake driver (tests/fakecuda), not a GPU's" in result.stdout
    assert not (tmp_path / "out").exists()


def test_on_the_fake_driver_it_writes_one_report_and_a_log(tmp_path: Path):
    out = tmp_path / "out"
    result = gpu_check("--fake-driver", "--out", str(out), "--python", sys.executable, env=real_driver_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("gpu-check (fake driver, not a GPU): ok;")
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.json", "gpu-check.log"]
    report = json.loads((out / "gpu-check.json").read_text())
    assert (report["label"], report["fake_driver"], report["ok"]) == ("fake driver, not a GPU", True, True)
    assert [s["name"] for s in report["steps"]] == ["pytest -m gpu", "driver costs", "kernel bandwidth"]
    tests = report["pytest"]
    assert tests["failed"] == tests["error"] == tests["passed"] == 0 and tests["skipped"] == len(tests["tests"]) > 5
    assert all(t["message"].startswith("no real CUDA driver") for t in tests["tests"])
    driver = report["driver_costs"]
    assert driver["fake_driver"] is True and driver["label"] == "fake driver, not a GPU"
    for call in ("cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemSetAccess[8 pages]", "cuMemUnmap", "cuMemRelease"):
        assert driver["per_call_us"][call]["n"] >= 4 and driver["per_call_us"][call]["p99"] >= 0
    assert {"cuMemExportToShareableHandle", "cuMemImportFromShareableHandle"} <= driver["per_call_us"].keys()
    assert driver["copy_pinned"]["host_to_device_gb_s"] > 0
    grow = driver["grow_per_gib"]
    assert grow["calls_per_gib"]["kvcached"] == {"cuMemCreate": 512, "cuMemMap": 512, "cuMemSetAccess": 512}
    assert grow["calls_per_gib"]["kvmem_daemon"]["cuMemSetAccess"] == 64 and grow["set_access_pages_per_call"] == 8
    # The calls the model counts for a local grow are the ones the driver saw.
    assert grow["kvmem_local_calls_counted_by_the_fake"] == grow["calls_per_gib"]["kvmem_local"]
    assert set(grow["measured_ms_p50"]) == {"kvmem_local", "kvmem_daemon"}
    assert grow["modeled_with_published_a100_ms_per_gib"]["kvcached"] == 117.99
    assert report["kernels"] == {"skipped": "torch sees no CUDA GPU (bench_kernels.py measured nothing)"}
    log = (out / "gpu-check.log").read_text()
    assert "===== driver costs: exit 0" in log
    with pytest.raises(ValueError, match="measured on the fake driver, not a GPU"):
        costs.load(out / "gpu-check.json")


# ---- the per-call costs the benchmarks model with ----


def measured(tmp_path: Path, **overrides) -> Path:
    per_call = {name: {"p50": us / 2, "p99": us, "n": 512} for name, us in costs.PUBLISHED_A100_US.items()}
    per_call["cuMemSetAccess[8 pages]"] = {"p50": 40.0, "p99": 50.0, "n": 64}
    data = {"fake_driver": False, "gpu": "NVIDIA H200", "date": "2026-12-02", "per_call_us": per_call, **overrides}
    path = tmp_path / "gpu_costs.json"
    path.write_text(json.dumps(data))
    return path


def test_without_a_measurement_the_published_a100_figures_are_used_and_say_so(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(costs, "MEASURED_PATH", tmp_path / "absent.json")
    published = costs.load()
    assert not published.measured and published.us == costs.PUBLISHED_A100_US
    assert "A100" in published.source and "published by kvcached" in published.source
    # bench_kv_cache's modeled figures: kvcached 512 x (193 + 1.45 + 36) µs; kvmem 512 maps and 64 set-access.
    assert costs.modeled_ms(costs.kvcached_calls(512), published) == pytest.approx(117.9904)
    calls = {"cuMemCreate": 0, "cuMemMap": 512, "cuMemSetAccess": 64, "cuMemImportFromShareableHandle": 512}
    assert costs.modeled_ms(calls, published, set_access_run=8) == pytest.approx(3.0464)  # imports not modeled


def test_a_measured_file_replaces_them_by_default_or_by_path(monkeypatch, tmp_path: Path):
    path = measured(tmp_path)
    loaded = costs.load(path)
    assert loaded.measured and loaded.us["cuMemCreate"] == 96.5
    assert loaded.source == "NVIDIA H200, measured by benchmarks/bench_driver.py on 2026-12-02"
    assert loaded.set_access_us(8) == 40.0 and loaded.set_access_us(64) == 18.0  # no 64-page figure: one page's
    monkeypatch.setattr(costs, "MEASURED_PATH", path)
    assert costs.load() == loaded
    report = tmp_path / "gpu-check.json"
    report.write_text(json.dumps({"check": "kvmem gpu-check", "driver_costs": json.loads(path.read_text())}))
    assert costs.load(report) == loaded


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fake_driver": True}, "measured on the fake driver"),
        ({"per_call_us": {"cuMemCreate": {"p50": 1.0}}}, "lacks cuMemMap, cuMemSetAccess, cuMemUnmap"),
    ],
)
def test_a_measurement_that_cannot_model_a_gpu_is_refused(tmp_path: Path, overrides: dict, message: str):
    with pytest.raises(ValueError, match=message):
        costs.load(measured(tmp_path, **overrides))


# ---- what travels ----


def test_the_wheel_check_refuses_more_than_can_travel(tmp_path: Path):
    script = str(REPO / "tools" / "gather_wheels.sh")
    with open(tmp_path / "big-1.0-py3-none-any.whl", "wb") as wheel:
        wheel.truncate(40 << 20)  # sparse: no disk used
    fits = subprocess.run(["bash", script, "--check", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert fits.returncode == 0, fits.stderr
    assert fits.stdout.startswith(f"gather_wheels: 1 wheels, {40 << 20} bytes, and the tree's")
    with open(tmp_path / "bigger-1.0-py3-none-any.whl", "wb") as wheel:
        wheel.truncate(30 << 20)
    over = subprocess.run(["bash", script, "--check", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert over.returncode == 1
    assert "of the 64 MiB that may travel" in over.stdout and "too much to travel" in over.stderr
