"""What every benchmark script shares: the machine it ran on, percentiles, its README table."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "benchmarks" / "README.md"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load() -> list[float]:
    """The machine's load average (1, 5, 15 min): record it beside every figure, the machine is shared."""
    return [round(x, 2) for x in os.getloadavg()]


def spread(values: list[float]) -> dict:
    """Median, lowest and highest of `values` (ratios of interleaved pairs), for a JSON result."""
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "all": [round(v, 3) for v in values],
    }


def machine() -> dict:
    """CPU, cores, Python, commit, date and load average of this run."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # no /proc/cpuinfo: keep what platform says
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "load_at_start": load(),
    }


def run_header(m: dict, detail: str) -> str:
    load_text = ""
    if "load_at_start" in m:
        load_text = f", load average {m['load_at_start'][0]:.1f} at the start"
    return f"Latest run: {m['date']}, commit `{m['commit']}`, {m['cpu']} ({m['cores']} cores){load_text}, {detail}."


def replace_readme_section(name: str, text: str) -> None:
    """Put `text` between the ``<!-- name:begin -->`` and ``<!-- name:end -->`` markers of the README."""
    readme = README.read_text()
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(readme):
        raise SystemExit(f"benchmarks/README.md has no {name} markers")
    README.write_text(pattern.sub(lambda mt: mt.group(1) + text + mt.group(2), readme))


def publish(result: dict, out: Path, text: str, readme_detail: str | None) -> None:
    """Write `result` as JSON to `out`, print `text` (its table) and where it went; with
    `readme_detail` (the run header's last words), put the run header and `text` in the README
    section named after ``result["benchmark"]``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    print(f"wrote {out}")
    if readme_detail is not None:
        replace_readme_section(result["benchmark"], f"{run_header(result['machine'], readme_detail)}\n\n{text}\n")
