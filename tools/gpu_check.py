"""`make gpu-check`: one short run that proves every GPU path of kvmem and measures the driver's costs.

    python3 tools/gpu_check.py [--out DIR] [--python PY] [--fake-driver]

On a machine where a real CUDA driver sees a GPU it runs, each with a time limit, in under 8 minutes:

1. ``pytest -m gpu``: the device contract on the real driver (tests/test_device.py's "cuda" cases), out
   of memory, a GPU access before set-access faulting, kvmemd with two engine processes (grants, kvctl
   limit, SIGKILL, scrub, sleep --offload / wake), the compiled kernels against the torch reference, and
   a tiny random-weight HF model on KvmemCache against the default cache (tests/test_gpu*.py,
   tests/test_kernels.py);
2. benchmarks/bench_driver.py: per-call VMM costs (p50/p99), pinned copy bandwidth, and the cost of
   growing by 1 GiB measured and modeled, kvcached's scheme beside it;
3. benchmarks/bench_kernels.py: the kernels' bandwidth against a device-to-device copy.

It writes ONE report, DIR/gpu-check.json (each step's command, exit status and time, the tests one by one
from pytest's junit XML, the driver costs and kernel bandwidth JSON), and DIR/gpu-check.log (every
step's output). It exits 1 if a step failed. Commit the report's driver costs as
benchmarks/gpu_costs.json to re-base the benchmarks' modeled figures (benchmarks/costs.py).

Where no real driver sees a GPU it says so in one line, names what it would run and exits 0, writing
nothing. --fake-driver runs steps 2 and 3 on tests/fakecuda (and step 1 on the gpu test files, which skip
without a real driver), labelled "fake driver, not a GPU": that is how CI tests this script.

Which Python runs the steps: --python, else this one if it has kvmem installed (a `kvmemd` beside it),
else a virtual environment made in /tmp from the wheels in .whl/ (tools/gather_wheels.sh) over the
system's packages, with kvmem installed editable from this tree, offline.

This file needs nothing but the standard library: it must run where nothing is installed yet.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".whl"
VENV = Path("/tmp/kvmem-gpu-venv")
DEADLINE_S = 470  # under 8 minutes in all, whatever each step's own limit

PARTS = (
    "pytest -m gpu (device contract on the real driver, kvmemd with two engines, kernels, a tiny HF model)",
    "benchmarks/bench_driver.py (VMM call costs, pinned copies, grow cost per GiB)",
    "benchmarks/bench_kernels.py (kernel bandwidth against a device copy)",
)


def probe_gpu() -> str | None:
    """None if a real CUDA driver loads here and sees a GPU, else why not (one clause)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver: libcuda.so.1 does not load"
    if hasattr(lib, "fakecuda_counter"):
        return "libcuda.so.1 here is kvmem's fake driver (tests/fakecuda), not a GPU's"
    result = lib.cuInit(0)
    if result != 0:
        return f"the CUDA driver does not initialize (cuInit returned {result})"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "the CUDA driver sees no GPU"
    return None


def has_kvmem(python: str) -> bool:
    if not (Path(python).parent / "kvmemd").exists():
        return False
    probe = "import kvmem.kernels, kvmemd, posix_ipc"
    return subprocess.run([python, "-c", probe], capture_output=True, cwd="/").returncode == 0


def venv_setup() -> list[tuple[str, list[str], float]]:
    """The steps that make a venv over the system's packages with the carried wheels and kvmem (editable),
    offline: --without-pip needs no ensurepip, the system's pip (seen through the system site) installs."""
    python = str(VENV / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir"]
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
    return [
        ("setup: venv", [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(VENV)], 60),
        ("setup: wheels", [*pip, "--no-compile", "--upgrade", *wheels], 120),
        ("setup: kvmem", [*pip, "--no-build-isolation", "-e", str(REPO)], 120),
    ]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the fake driver or Triton's interpreter (a real GPU compiles)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKECUDA_") and k != "TRITON_INTERPRET"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def run_step(name: str, command: list[str], limit: float, log, env: dict[str, str]) -> dict:
    """Run one step in a session of its own, so that on time-out its daemons and engines die with it."""
    log.write(f"\n===== {name}\n$ {' '.join(command)}\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    seconds = round(time.monotonic() - t0, 1)
    log.write(f"===== {name}: {'timed out' if rc is None else f'exit {rc}'} after {seconds} s\n")
    log.flush()
    return {"name": name, "command": command, "rc": rc, "timed_out": rc is None, "seconds": seconds}


def outcome(step: dict) -> str:
    if "skipped" in step:
        return f"{step['name']} (skipped: {step['skipped']})"
    how = "timed out" if step["timed_out"] else f"exit {step['rc']}"
    return f"{step['name']} ({how})"


def junit_summary(path: Path) -> dict:
    """Counts and every test case (name, outcome, seconds, message) from pytest's junit XML."""
    if not path.exists():
        return {"missing": "pytest wrote no junit XML (see the log)"}
    cases = []
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome = "failed" if kind == "failure" else kind
                message = (element.get("message") or element.text or "")[:2000]
                break
        cases.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "seconds": round(float(case.get("time") or 0), 2),
                **({"message": message} if message else {}),
            }
        )
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "tests": cases}


def read_json(path: Path, step: dict) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"missing": f"{path.name} was not written (step exit {step['rc']})"}


def versions(python: str) -> dict:
    code = (
        "import json, importlib.metadata as m\n"
        "names = ('torch', 'triton', 'transformers', 'cuda-bindings', 'posix_ipc', 'numpy', 'kvmem')\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "print(json.dumps(out))"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/")
    return json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr[-500:]}


def gpu_info() -> str | None:
    try:
        query = "--query-gpu=name,memory.total,driver_version"
        result = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
    except OSError:
        return None
    return result.stdout.strip() or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "gpu-check-out")
    parser.add_argument("--python", help="the interpreter for the steps (default: see above)")
    parser.add_argument("--fake-driver", action="store_true", help='the steps on tests/fakecuda: "not a GPU"')
    args = parser.parse_args()

    reason = probe_gpu()
    if reason is not None and not args.fake_driver:
        print(f"gpu-check: no GPU here ({reason}); on a GPU it would run: {'; '.join(PARTS)}. Nothing run.")
        return 0

    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.out / ".parts"
    scratch.mkdir(exist_ok=True)
    label = "fake driver, not a GPU" if args.fake_driver else "real GPU"
    with open(args.out / "gpu-check.log", "w") as log:
        steps: list[dict] = []
        ready = args.python or (sys.executable if has_kvmem(sys.executable) else None)
        python = ready or str(VENV / "bin" / "python")
        to_run = [] if ready else venv_setup()
        junit = scratch / "junit.xml"
        driver_json, kernels_json = scratch / "driver.json", scratch / "kernels.json"
        pytest_targets = ["tests/test_gpu.py", "tests/test_gpu_paths.py"] if args.fake_driver else ["tests"]
        fake_flags = ["--fake-driver", "--pages", "32", "--copy-mib", "8", "--repeats", "1"] if args.fake_driver else []
        pytest = [python, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-v", "-rfEs", f"--junitxml={junit}"]
        # On a GPU the test process needs no fake driver (nor gcc to build it): "real" leaves it out.
        pytest_env = {} if args.fake_driver else {"KVMEM_TEST_DRIVER": "real"}
        to_run += [
            ("pytest -m gpu", [*pytest, "--durations=20", *pytest_targets], 360),
            ("driver costs", [python, "benchmarks/bench_driver.py", "--out", str(driver_json), *fake_flags], 120),
            (
                "kernel bandwidth",
                [python, "benchmarks/bench_kernels.py", "--runs", "20", "--out", str(kernels_json)],
                120,
            ),
        ]
        for name, command, limit in to_run:
            left = DEADLINE_S - (time.monotonic() - started)
            if left < 10 or any(step["rc"] != 0 for step in steps if step["name"].startswith("setup")):
                why = "no time left" if left < 10 else "the setup failed"
                steps.append({"name": name, "command": command, "rc": None, "skipped": why})
                continue
            env = clean_env(**pytest_env) if name == "pytest -m gpu" else clean_env()
            steps.append(run_step(name, command, min(limit, left), log, env))
        by_name = {step["name"]: step for step in steps}
        kernels = read_json(kernels_json, by_name["kernel bandwidth"])
        if not kernels_json.exists() and by_name["kernel bandwidth"]["rc"] == 0:
            kernels = {"skipped": "torch sees no CUDA GPU (bench_kernels.py measured nothing)"}
        report = {
            "check": "kvmem gpu-check",
            "label": label,
            "fake_driver": args.fake_driver,
            "no_gpu_reason": reason,
            "ok": all(step["rc"] == 0 for step in steps),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "seconds": round(time.monotonic() - started, 1),
            "machine": {
                "gpu": gpu_info(),
                "host": platform.node(),
                "cores": os.cpu_count(),
                "python": python,
                "versions": versions(python),
            },
            "steps": steps,
            "pytest": junit_summary(junit),
            "driver_costs": read_json(driver_json, by_name["driver costs"]),
            "kernels": kernels,
        }
    for part in scratch.iterdir():
        part.unlink()
    scratch.rmdir()
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    tests = report["pytest"]
    counts = ", ".join(f"{tests.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped"))
    verdict = "ok" if report["ok"] else "FAILED: " + ", ".join(outcome(step) for step in steps if step["rc"] != 0)
    print(
        f"gpu-check ({label}): {verdict}; tests {counts}; {report['seconds']} s; report {args.out / 'gpu-check.json'}"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
