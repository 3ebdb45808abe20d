"""The installed distribution: console scripts, non-colliding package names, the main job."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import REPO, real_driver_env, real_driver_loads, run_python

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", ["kvmemd", "kvctl"])
def test_console_scripts_show_help_and_version(script: str):
    version = subprocess.run([BIN / script, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"{script}, version 0.1.0"
    usage = subprocess.run([BIN / script, "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and usage.stdout.startswith(f"Usage: {script} ")


def test_cli_and_kernels_live_inside_kvmem_never_top_level():
    code = (
        "import importlib.util as u; import kvmem.cli, kvmem.kernels; "
        "print(u.find_spec('cli'), u.find_spec('kernels'), kvmem.cli.__file__.endswith('cli/__init__.py'))"
    )
    with tempfile.TemporaryDirectory() as elsewhere:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None", "True"]


def test_kvctl_device_reports_the_fake_gpu_as_json():
    result = subprocess.run([BIN / "kvctl", "device", "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["kind"] == "cuda" and data["granularity"] == 2 << 20 and data["total_bytes"] == 512 << 20


def test_kvctl_device_error_is_one_line_and_nonzero():
    result = subprocess.run(
        [BIN / "kvctl", "--gpu", "5", "device", "--device", "cuda"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: GPU 5 does not exist: the driver sees 1 GPU(s)"
    assert result.stdout == ""


@pytest.mark.parametrize("kind", ["host", "cuda"])
def test_device_roundtrip_shares_pages_between_two_processes(kind: str):
    demo = REPO / "examples" / "device_roundtrip.py"
    result = subprocess.run(
        [sys.executable, demo, "--device", kind, "--pages", "3"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"ok: 3 pages shared between two processes on the {kind} device" in result.stdout
    assert "all pages match" in result.stdout


def test_device_roundtrip_on_the_default_device_of_a_machine_without_a_gpu():
    if real_driver_loads():
        pytest.skip("a real CUDA driver is installed here")
    result = run_python(
        "import runpy, sys; sys.argv = ['device_roundtrip.py']; runpy.run_path('examples/device_roundtrip.py', "
        "run_name='__main__')",
        env=real_driver_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "ok: 4 pages shared between two processes on the host device" in result.stdout


def test_the_systemd_unit_starts_kvmemd_with_options_that_exist():
    """Every KVMEM_* variable the unit and its README name is one `kvmemd start` reads."""
    unit = (REPO / "examples" / "deploy" / "kvmemd@.service").read_text()
    readme = (REPO / "examples" / "deploy" / "README.md").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split()[1:] == ["start", "--gpu", "%i"]
    help_text = subprocess.run(
        [BIN / "kvmemd", "start", "--help"], capture_output=True, text=True, timeout=60, env={"COLUMNS": "300"}
    ).stdout
    known = set(re.findall(r"env\s+var:\s+(KVMEM_[A-Z_]+)", help_text))
    named = set(re.findall(r"\bKVMEM_[A-Z_]+\b", unit + readme))
    assert "KVMEM_BUDGET" in known and named <= known, sorted(named - known)


def test_every_package_of_the_source_tree_is_in_the_distribution():
    """pyproject.toml lists the packages by name (cli/ and kernels/ are mapped into kvmem): a package
    directory missing there works in an editable install and is absent from a built wheel."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    mapped = {"cli": "kvmem.cli", "kernels": "kvmem.kernels"}
    found = set()
    for init in REPO.glob("**/__init__.py"):
        parts = init.parent.relative_to(REPO).parts
        if parts[0] in ("kvmem", "kvmemd"):
            found.add(".".join(parts))
        elif parts[0] in mapped:
            found.add(".".join((mapped[parts[0]], *parts[1:])))
    assert found - listed == set()
