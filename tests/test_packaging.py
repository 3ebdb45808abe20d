"""The installed distribution: console scripts, non-colliding package names, the main job."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
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
    unit = (REPO / "deploy" / "systemd" / "kvmemd@.service").read_text()
    unit += (REPO / "deploy" / "systemd" / "kvmemd@.service.d" / "metrics.conf").read_text()
    readme = (REPO / "deploy" / "README.md").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split()[1:] == ["start", "--device", "cuda", "--gpu", "%i"]
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


# What `kvmemd --help`, `kvctl --help` and `import kvmem.kernels` import, beside kvmem itself: the light
# dependencies, and torch for the kernels (the pinned CPU build; `typing-extensions` is the one
# requirement of torch's that importing it needs). cuda-bindings is left out: nothing here calls the
# driver, and kvmem imports it only then.
WHEEL_TEST_DEPS = ["click", "posix_ipc", "psutil", "numpy", "prometheus-client", "torch==2.13.0", "typing-extensions"]


def _source_copy(dest: Path) -> Path:
    """The working tree's files (tracked, and new ones git does not ignore) under `dest`: a wheel
    built from the checkout itself would also pick up a stale build/ directory."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_the_wheel_installs_into_a_fresh_venv_and_runs_outside_the_source_tree(tmp_path: Path):
    """README's install from a clone, as a wheel: it carries the daemon, kvctl, the kernels and both
    engines' entry points, and works with nothing of the source tree on the path."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the source tree's files")
    source = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("kvmem-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read("kvmem-0.1.0.dist-info/entry_points.txt").decode()
    for module in ("kvmemd/cli.py", "kvmem/cli/main.py", "kvmem/kernels/triton_kernels.py", "kvmem/device/cuda.py"):
        assert module in names, module
    assert not {n for n in names if n.startswith(("cli/", "kernels/", "tests/"))}
    for extension in ("kvmem/_block_allocator.", "kvmem/device/_host_copy."):  # the C extensions
        assert [n for n in names if n.startswith(extension) and n.endswith(".so")], extension
    for line in (
        "kvmemd = kvmemd.cli:main",
        "kvctl = kvmem.cli.main:main",
        "kvmem = kvmem.integrations.vllm:register",
        "kvmem = kvmem.integrations.sglang:activate",
    ):
        assert line in entry_points, line

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    # --no-compile: byte-compiling torch would double the install's time; pip's cache is reused.
    install = subprocess.run(
        [venv / "bin" / "pip", "install", "-q", "--no-compile", "--no-deps", wheel, *WHEEL_TEST_DEPS],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "COLUMNS": "200"}
    for script in ("kvmemd", "kvctl"):
        result = subprocess.run(
            [venv / "bin" / script, "--help"], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=120
        )
        assert result.returncode == 0 and result.stdout.startswith(f"Usage: {script} "), result.stderr
    probe = (
        "import importlib.metadata as m, kvmem, kvmem.kernels, kvmemd, kvmem._block_allocator as c; "
        "import ctypes, kvmem.device._host_copy as h; "
        "print(kvmem.kernels.__file__, kvmemd.__file__, c.__file__); "
        "print(sorted(e.value for g in ('vllm.general_plugins', 'sglang.srt.platforms') "
        "for e in m.entry_points(group=g) if e.dist.name == 'kvmem')); "
        "a = c.BlockAllocator(4, 2); a.add_slot(1); print(a.alloc(3)); "
        "src, dst = ctypes.create_string_buffer(b'x' * 8192, 8192), ctypes.create_string_buffer(8192); "
        "h.stream(ctypes.addressof(dst), ctypes.addressof(src), 8192); print(dst.raw == src.raw)"
    )
    result = subprocess.run(
        [venv / "bin" / "python", "-c", probe], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    files, plugins, ids, copied = result.stdout.splitlines()
    assert ids == "[4, 5, 6]" and copied == "True"  # the C extensions, built into the wheel
    site = str(venv / "lib")
    assert all(f.startswith(site) for f in files.split()), files
    assert plugins == "['kvmem.integrations.sglang:activate', 'kvmem.integrations.vllm:register']"
