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


# Pinned host <-> device copy bandwidth until a GPU run's `copy_pinned` (benchmarks/bench_driver.py) is
# committed in gpu_costs.json: the link rate of PCIe 4.0 x16, an A100 PCIe's link (16 GT/s x 16 lanes x
# 128b/130b encoding = 31.5 GB/s each way, PCIe 4.0 base specification). An upper bound: a measured
# copy runs below it.
PCIE4_X16_GB_S = 31.5
PCIE4_X16_SOURCE = "PCIe 4.0 x16 link rate (31.5 GB/s each way), an upper bound, not measured here"


@dataclass(frozen=True)
class CopyBandwidth:
    """Pinned host <-> device copy bandwidth in GB/s (1e9 bytes per second)."""

    host_to_device_gb_s: float
    device_to_host_gb_s: float
    source: str
    measured: bool


def load_copy_bandwidth(path: Path | None = None) -> CopyBandwidth:
    """The `copy_pinned` figures at `path` (default: benchmarks/gpu_costs.json if it has them), else the
    PCIe 4.0 x16 link rate. A file measured on the fake driver is refused, as in `load`."""
    if path is None and not MEASURED_PATH.exists():
        return CopyBandwidth(PCIE4_X16_GB_S, PCIE4_X16_GB_S, PCIE4_X16_SOURCE, measured=False)
    path = path or MEASURED_PATH
    data = json.loads(Path(path).read_text())
    data = data.get("driver_costs", data)
    if data.get("fake_driver", True):
        raise ValueError(f"{path} was measured on the fake driver, not a GPU: its figures model nothing")
    copy = data.get("copy_pinned")
    if not copy:
        return CopyBandwidth(PCIE4_X16_GB_S, PCIE4_X16_GB_S, PCIE4_X16_SOURCE, measured=False)
    source = f"{data['gpu']}, measured by benchmarks/bench_driver.py on {data['date']}"
    return CopyBandwidth(copy["host_to_device_gb_s"], copy["device_to_host_gb_s"], source, measured=True)


def sleep_wake_model(
    pages: int, page_bytes: int, batch_pages: int, ranges: int, costs: CallCosts, copy: CopyBandwidth
) -> dict:
    """Modeled offload-sleep and wake of `pages` pages on a GPU, as kvmem pipelines them.

    Sleep: the engine unmaps (cuMemUnmap per page) while the daemon copies the batches already handed
    over to pinned host memory; wake: the daemon copies batch after batch into pages while the engine
    maps the batches already sent (cuMemMap per page), then sets access once per range of the cache
    (`ranges`: every layer's K and V). Two pipelined stages take the slower stage's whole time plus one
    batch of the other (the pipeline filling); *serial*, one stage after the other (the former code).
    Imports and messages have no per-call figure and are left out. Returns ms, and each against the bare
    copy of the same bytes at the pinned-copy bandwidth (1.0x: as fast as the copy alone).
    """
    size = pages * page_bytes
    batches = max(1, -(-pages // batch_pages))

    def two_stages(a_ms: float, b_ms: float) -> float:
        return max(a_ms, b_ms) + min(a_ms, b_ms) / batches

    dtoh_ms = size / (copy.device_to_host_gb_s * 1e9) * 1e3
    htod_ms = size / (copy.host_to_device_gb_s * 1e9) * 1e3
    unmap_ms = pages * costs.us["cuMemUnmap"] / 1e3
    map_ms = pages * costs.us["cuMemMap"] / 1e3
    access_ms = ranges * costs.set_access_us(pages // ranges) / 1e3
    sleep_ms = two_stages(unmap_ms, dtoh_ms)
    wake_ms = two_stages(htod_ms, map_ms) + access_ms
    return {
        "pages": pages,
        "sleep_ms": round(sleep_ms, 2),
        "wake_ms": round(wake_ms, 2),
        "sleep_serial_ms": round(unmap_ms + dtoh_ms, 2),
        "wake_serial_ms": round(htod_ms + map_ms + access_ms, 2),
        "sleep_vs_pinned_copy": round(dtoh_ms / sleep_ms, 3),
        "wake_vs_pinned_copy": round(htod_ms / wake_ms, 3),
        "costs": costs.source,
        "copy_bandwidth": copy.source,
    }
