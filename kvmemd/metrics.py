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


class StatusCollector(Collector):
    """Gauges and counters read off the daemon's status segment at each scrape."""

    def __init__(self, shm_name: str):
        self.shm_name = shm_name

    def collect(self) -> Iterator[Metric]:
        try:
            with StatusReader(self.shm_name) as reader:
                snap = reader.snapshot()
        except StatusError:
            return  # not published yet, or going away: a scrape without these series
        d = snap.daemon
        page = d.page_size

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("kvmem_budget_bytes", "Most memory the daemon hands out.", d.budget_pages * page)
        yield gauge("kvmem_page_size_bytes", "Bytes per page.", page)
        yield gauge("kvmem_pages_created", "Pages that exist (free and granted).", d.pages_created)
        pages = GaugeMetricFamily("kvmem_pages", "Pages by state.", labels=["state"])
        pages.add_metric(["free_clean"], d.pages_free_clean)
        pages.add_metric(["free_dirty"], d.pages_free - d.pages_free_clean)
        pages.add_metric(["granted"], d.pages_granted)
        pages.add_metric(["quarantined"], d.pages_quarantined)
        yield pages
        yield gauge("kvmem_host_tier_used_bytes", "Sleeping models' pages kept in host memory.", d.host_tier_used_bytes)
        yield gauge("kvmem_host_tier_capacity_bytes", "Capacity of the host tier.", d.host_tier_capacity_bytes)
        for name, doc, value in (
            ("kvmem_grants", "Grow requests served in full.", d.grants),
            ("kvmem_denies", "Grow requests denied (limit, budget, asleep).", d.denies),
            ("kvmem_reclaims", "Requests to engines to give pages back.", d.reclaims),
            ("kvmem_sleeps", "Models put to sleep.", d.sleeps),
            ("kvmem_wakes", "Models woken.", d.wakes),
        ):
            yield CounterMetricFamily(name, doc, value=value)

        per_model = {
            "mapped": GaugeMetricFamily("kvmem_model_mapped_bytes", "Memory granted to the model.", labels=["model"]),
            "used": GaugeMetricFamily("kvmem_model_used_bytes", "Memory holding live KV blocks.", labels=["model"]),
            "limit": GaugeMetricFamily("kvmem_model_limit_bytes", "The model's limit.", labels=["model"]),
            "min": GaugeMetricFamily("kvmem_model_min_bytes", "The model's guaranteed minimum.", labels=["model"]),
            "saved": GaugeMetricFamily("kvmem_model_saved_bytes", "Its cache in the host tier.", labels=["model"]),
            "priority": GaugeMetricFamily("kvmem_model_priority", "The model's priority.", labels=["model"]),
        }
        state = GaugeMetricFamily("kvmem_model_state", "1 for the model's current state.", labels=["model", "state"])
        counters = {
            "grants": CounterMetricFamily("kvmem_model_grants", "Grow requests served.", labels=["model"]),
            "denies": CounterMetricFamily("kvmem_model_denies", "Grow requests denied.", labels=["model"]),
            "reclaims": CounterMetricFamily("kvmem_model_reclaims", "Page requests sent.", labels=["model"]),
            "sleeps": CounterMetricFamily("kvmem_model_sleeps", "Times put to sleep.", labels=["model"]),
        }
        for m in snap.models:
            label = [m.model]
            per_model["mapped"].add_metric(label, m.mapped_pages * page)
            per_model["used"].add_metric(label, m.used_pages * page)
            if m.limit_pages >= 0:
                per_model["limit"].add_metric(label, m.limit_pages * page)
            per_model["min"].add_metric(label, m.min_pages * page)
            per_model["saved"].add_metric(label, m.saved_pages * page)
            per_model["priority"].add_metric(label, m.priority)
            for name in STATES:
                state.add_metric([m.model, name], 1.0 if m.state.name.lower() == name else 0.0)
            for key, family in counters.items():
                family.add_metric(label, getattr(m, key))
        yield from per_model.values()
        yield state
        yield from counters.values()


class MetricsServer:
    """The HTTP endpoint: `/metrics` on `address:port` (port 0 picks a free one). Stop with `close()`."""

    def __init__(self, shm_name: str, port: int, address: str = "127.0.0.1"):
        self.registry = CollectorRegistry()
        self.registry.register(StatusCollector(shm_name))
        self.grant_latency = Histogram(
            "kvmem_grant_latency_seconds",
            "Time from a grow request to its last page granted.",
            buckets=GRANT_LATENCY_BUCKETS,
            registry=self.registry,
        )
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
