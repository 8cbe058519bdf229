"""Prometheus metrics of the coordinator, served on `--metrics-port` (text format at /metrics).

Besides the round gauges and counters: process metrics and `fedcmp_build_info` (common to every
fedcmp endpoint), round durations, and per-client series read from the coordinator at scrape
time (seconds since each client last called, its state and its step progress).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fedcmp.common.prometheus import new_registry, serve_metrics
from fedcmp.server.rounds import Phase

if TYPE_CHECKING:
    from fedcmp.server.rounds import Coordinator

DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


class CoordinatorMetrics:
    """The gauges and counters an operator alerts on; updated by the coordinator as rounds move."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        self.round = Gauge("fedcmp_round", "Current (or last committed) round", registry=self.registry)
        self.phase = Gauge("fedcmp_phase", "1 for the coordinator's current phase", ["phase"], registry=self.registry)
        self.clients = Gauge("fedcmp_registered_clients", "Registered client daemons", registry=self.registry)
        self.uploads = Counter("fedcmp_uploads_total", "Client uploads by outcome", ["outcome"],
                               registry=self.registry)
        self.upload_bytes = Counter("fedcmp_upload_bytes_total", "Bytes of accepted uploads", registry=self.registry)
        self.aggregation = Histogram("fedcmp_aggregation_seconds", "Strategy aggregation time per round",
                                     buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=self.registry)
        self.round_duration = Histogram("fedcmp_round_duration_seconds",
                                        "Wall time of a round, from opening to commit", buckets=DURATION_BUCKETS,
                                        registry=self.registry)
        self.last_round_duration = Gauge("fedcmp_last_round_duration_seconds", "Wall time of the last committed round",
                                         registry=self.registry)
        self.train_loss = Gauge("fedcmp_train_loss", "Sample-weighted client train loss of the last round",
                                registry=self.registry)
        self.val_loss = Gauge("fedcmp_val_loss", "Held-out loss of the global the last round started from",
                              registry=self.registry)

    def serve(self, port: int, host: str) -> None:
        serve_metrics(self.registry, port, host)

    def track_clients(self, coordinator: Coordinator) -> None:
        """Export per-client series read from `coordinator` at every scrape."""
        self.registry.register(ClientsCollector(coordinator))

    def set_phase(self, phase: Phase, round_index: int, registered: int) -> None:
        for each in Phase:
            self.phase.labels(phase=each.value).set(1.0 if each is phase else 0.0)
        self.round.set(round_index)
        self.clients.set(registered)

    def round_committed(self, row: dict) -> None:
        """A committed round's record: server fields at the top, client metric means under "metrics"."""
        self.aggregation.observe(row["aggregation_s"])
        self.round_duration.observe(row["duration_s"])
        self.last_round_duration.set(row["duration_s"])
        for gauge, key in ((self.train_loss, "train_loss"), (self.val_loss, "val_loss")):
            if key in row["metrics"]:
                gauge.set(row["metrics"][key])


class ClientsCollector(Collector):
    """Per-client series read from the live records at scrape time: `fedcmp_client_last_seen_seconds`,
    `fedcmp_client_state{state}`, and the progress of a training client's task (`fedcmp_client_task_step`,
    `fedcmp_client_task_total_steps`, `fedcmp_client_task_eta_seconds`; absent while unknown), as its heartbeats
    report it (the client's own exporter, `--metrics-port`, has the same without the `client` label)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.monotonic()
        last_seen = GaugeMetricFamily("fedcmp_client_last_seen_seconds", "Seconds since the client last called",
                                      labels=["client"])
        state = GaugeMetricFamily("fedcmp_client_state", "1 for the client's current state", labels=["client", "state"])
        step = GaugeMetricFamily("fedcmp_client_task_step", "Optimizer steps done in the client's training task",
                                 labels=["client"])
        total = GaugeMetricFamily("fedcmp_client_task_total_steps", "Steps the client's training task asks for",
                                  labels=["client"])
        eta = GaugeMetricFamily("fedcmp_client_task_eta_seconds", "Seconds left in the client's training task at its pace",
                                labels=["client"])
        for client in list(self.coordinator.clients.values()):
            last_seen.add_metric([client.client_id], now - client.last_seen)
            state.add_metric([client.client_id, client.state], 1.0)
            if client.state == "training" and client.progress.total_steps:
                step.add_metric([client.client_id], client.progress.step)
                total.add_metric([client.client_id], client.progress.total_steps)
                if (seconds := client.progress.eta_s(now)) >= 0:
                    eta.add_metric([client.client_id], seconds)
        yield from (last_seen, state, step, total, eta)
