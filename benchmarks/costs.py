"""The one source of per-call CUDA VMM costs the benchmarks model with.

Until a GPU run has measured them, the figures are the ones kvcached publishes for an A100 (DESIGN §8:
cuMemCreate 193 µs per 2 MiB page, cuMemMap 1.45 µs, cuMemSetAccess 36 µs, cuMemUnmap 26 µs), labelled
as such. When ``benchmarks/gpu_costs.json`` exists (committed from ``make gpu-check``: the
``driver_costs`` of its report, or the whole report), or a path is given, the p50 figures measured there
replace them. A measurement made on the fake driver is refused: it says nothing about a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MEASURED_PATH = Path(__file__).resolve().parent / "gpu_costs.json"

PUBLISHED_A100_US = {"cuMemCreate": 193.0, "cuMemMap": 1.45, "cuMemSetAccess": 36.0, "cuMemUnmap": 26.0}
PUBLISHED_SOURCE = "A100, published by kvcached (DESIGN.md §8), not measured here"


@dataclass(frozen=True)
class CallCosts:
    """Microseconds per driver call (per 2 MiB page where a call takes one page)."""

    us: dict[str, float]
    source: str
    measured: bool

    def set_access_us(self, pages: int) -> float:
        """One cuMemSetAccess over a run of `pages` pages: the measured run of that length if there is one,
        else the one-page figure (the published figure is per page)."""
        return self.us.get(f"cuMemSetAccess[{pages} pages]", self.us["cuMemSetAccess"])


def load_published() -> CallCosts:
    return CallCosts(dict(PUBLISHED_A100_US), PUBLISHED_SOURCE, measured=False)


def load(path: Path | None = None) -> CallCosts:
    """The measured costs at `path` (default: benchmarks/gpu_costs.json if it exists), else the published ones.

    Raises:
        ValueError: `path` holds no per-call figures, or figures measured on the fake driver.
    """
    if path is None:
        if not MEASURED_PATH.exists():
            return load_published()
        path = MEASURED_PATH
    data = json.loads(Path(path).read_text())
    data = data.get("driver_costs", data)  # a whole gpu-check report, or its driver_costs part
    if "per_call_us" not in data:
        raise ValueError(f"{path} holds no per_call_us figures")
    if data.get("fake_driver", True):
        raise ValueError(f"{path} was measured on the fake driver, not a GPU: its figures model nothing")
    us = {name: float(figures["p50"]) for name, figures in data["per_call_us"].items()}
    missing = set(PUBLISHED_A100_US) - us.keys()
    if missing:
        raise ValueError(f"{path} lacks {', '.join(sorted(missing))}")
    return CallCosts(us, f"{data['gpu']}, measured by benchmarks/bench_driver.py on {data['date']}", measured=True)


def modeled_ms(calls: dict[str, int], costs: CallCosts, set_access_run: int = 1) -> float:
    """The time `calls` (driver call name -> count) take at `costs`; each cuMemSetAccess covers
    `set_access_run` pages. Calls with no figure are left out (the caller reports them)."""
    total = 0.0
    for name, count in calls.items():
        if name == "cuMemSetAccess":
            total += count * costs.set_access_us(set_access_run)
        elif name in costs.us:
            total += count * costs.us[name]
    return total / 1e3


def kvcached_calls(pages: int) -> dict[str, int]:
    """kvcached's scheme for `pages` new pages: one cuMemCreate, one cuMemMap and one cuMemSetAccess per page
    (each page belongs to one layer's K or V), no physical handle reused."""
    return {"cuMemCreate": pages, "cuMemMap": pages, "cuMemSetAccess": pages}
