"""Prometheus metrics for `kvmemd start --metrics-port`.

Design note
-----------
The scrape runs on the metrics server's own thread and must never race the event loop, so every
gauge and counter is read from the daemon's published status (`kvmem.common.status`: a consistent
seqlock snapshot, at most one heartbeat old) rather than from the loop's live objects. The one
thing the status does not carry, the grant latency distribution, is a prometheus-client
`Histogram` the loop observes into (its updates are thread-safe).

Names follow Prometheus conventions: base units (bytes, seconds), ``_total`` on counters, one
``model`` label on per-model series. A model without a limit has no ``kvmem_model_limit_bytes``
sample.

Fleet labels. Every series carries the daemon's GPU, so that one Prometheus can hold a fleet's
daemons side by side and a dashboard can pick a GPU: ``gpu_uuid`` (the GPU's UUID, what identifies
a daemon, `kvmemd.launcher.gpu_lock_name`), ``gpu`` (the ordinal the daemon was started with:
nvidia-smi's index where CUDA_DEVICE_ORDER=PCI_BUS_ID, as deploy/ sets) and, where the operator
gives one (``--node-name``, e.g. the node's name from Kubernetes' downward API), ``node``. A
host-memory daemon serves no GPU: its ``gpu_uuid`` is ``host`` (it has no UUID, and several may run
side by side, told apart by ``gpu``). These are fixed for the daemon's life, so they are constant
labels on every family rather than something read from the status segment (which holds no UUID).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvmem.common.status import ModelState, StatusError, StatusReader

# From a few hundred microseconds (pages ready in the pool) to seconds (waiting for a reclaim).
GRANT_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
STATES = [s.name.lower() for s in ModelState if s is not ModelState.EMPTY]
HOST_UUID_LABEL = "host"  # the gpu_uuid of a host-memory daemon (see the design note)


def fleet_labels(gpu: int, uuid: str | None, node: str | None = None) -> dict[str, str]:
    """The labels every series of the daemon for ordinal `gpu` carries (`uuid` None: a host daemon)."""
    labels = {"gpu": str(gpu), "gpu_uuid": uuid if uuid is not None else HOST_UUID_LABEL}
    if node:
        labels["node"] = node
    return labels


class StatusCollector(Collector):
    """Gauges and counters read off the daemon's status segment at each scrape."""

    def __init__(self, shm_name: str, labels: dict[str, str]):
        self.shm_name = shm_name
        self.names, self.values = list(labels), list(labels.values())

    def collect(self) -> Iterator[Metric]:
        try:
            with StatusReader(self.shm_name) as reader:
                snap = reader.snapshot()
        except StatusError:
            return  # not published yet, or going away: a scrape without these series
        d = snap.daemon
        page = d.page_size

        names, values = self.names, self.values

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        yield gauge("kvmem_budget_bytes", "Most memory the daemon hands out.", d.budget_pages * page)
        yield gauge("kvmem_page_size_bytes", "Bytes per page.", page)
        yield gauge("kvmem_pages_created", "Pages that exist (free and granted).", d.pages_created)
        pages = GaugeMetricFamily("kvmem_pages", "Pages by state.", labels=[*names, "state"])
        pages.add_metric([*values, "free_clean"], d.pages_free_clean)
        pages.add_metric([*values, "free_dirty"], d.pages_free - d.pages_free_clean)
        pages.add_metric([*values, "granted"], d.pages_granted)
        pages.add_metric([*values, "quarantined"], d.pages_quarantined)
        yield pages
        reserve = GaugeMetricFamily(
            "kvmem_reserve_pages", "The warm reserve's watermarks: free pages kept made.", labels=[*names, "bound"]
        )
        reserve.add_metric([*values, "low"], d.reserve_low_pages)
        reserve.add_metric([*values, "high"], d.reserve_high_pages)
        yield reserve
        yield gauge("kvmem_host_tier_used_bytes", "Sleeping models' pages kept in host memory.", d.host_tier_used_bytes)
        yield gauge("kvmem_host_tier_capacity_bytes", "Capacity of the host tier.", d.host_tier_capacity_bytes)
        for name, doc, value in (
            ("kvmem_grants", "Grow requests served in full.", d.grants),
            ("kvmem_denies", "Grow requests denied (limit, budget, asleep).", d.denies),
            ("kvmem_reclaims", "Requests to engines to give pages back.", d.reclaims),
            ("kvmem_sleeps", "Models put to sleep.", d.sleeps),
            ("kvmem_wakes", "Models woken.", d.wakes),
        ):
            counter = CounterMetricFamily(name, doc, labels=names)
            counter.add_metric(values, value)
            yield counter

        by_model = [*names, "model"]
        per_model = {
            "mapped": GaugeMetricFamily("kvmem_model_mapped_bytes", "Memory granted to the model.", labels=by_model),
            "used": GaugeMetricFamily("kvmem_model_used_bytes", "Memory holding live KV blocks.", labels=by_model),
            "limit": GaugeMetricFamily("kvmem_model_limit_bytes", "The model's limit.", labels=by_model),
            "min": GaugeMetricFamily("kvmem_model_min_bytes", "The model's guaranteed minimum.", labels=by_model),
            "saved": GaugeMetricFamily("kvmem_model_saved_bytes", "Its cache in the host tier.", labels=by_model),
            "priority": GaugeMetricFamily("kvmem_model_priority", "The model's priority.", labels=by_model),
        }
        state = GaugeMetricFamily("kvmem_model_state", "1 for the model's current state.", labels=[*by_model, "state"])
        counters = {
            "grants": CounterMetricFamily("kvmem_model_grants", "Grow requests served.", labels=by_model),
            "denies": CounterMetricFamily("kvmem_model_denies", "Grow requests denied.", labels=by_model),
            "reclaims": CounterMetricFamily("kvmem_model_reclaims", "Page requests sent.", labels=by_model),
            "sleeps": CounterMetricFamily("kvmem_model_sleeps", "Times put to sleep.", labels=by_model),
        }
        for m in snap.models:
            label = [*values, m.model]
            per_model["mapped"].add_metric(label, m.mapped_pages * page)
            per_model["used"].add_metric(label, m.used_pages * page)
            if m.limit_pages >= 0:
                per_model["limit"].add_metric(label, m.limit_pages * page)
            per_model["min"].add_metric(label, m.min_pages * page)
            per_model["saved"].add_metric(label, m.saved_pages * page)
            per_model["priority"].add_metric(label, m.priority)
            for name in STATES:
                state.add_metric([*values, m.model, name], 1.0 if m.state.name.lower() == name else 0.0)
            for key, family in counters.items():
                family.add_metric(label, getattr(m, key))
        yield from per_model.values()
        yield state
        yield from counters.values()


class MetricsServer:
    """The HTTP endpoint: `/metrics` on `address:port` (port 0 picks a free one), every series carrying
    `labels` (`fleet_labels`). Stop with `close()`."""

    def __init__(self, shm_name: str, port: int, labels: dict[str, str], address: str = "127.0.0.1"):
        self.registry = CollectorRegistry()
        self.registry.register(StatusCollector(shm_name, labels))
        self.grant_latency = Histogram(
            "kvmem_grant_latency_seconds",
            "Time from a grow request to its last page granted.",
            labelnames=list(labels),
            buckets=GRANT_LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=address, registry=self.registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        """Stop serving. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
