"""Prometheus metrics of the coordinator, served on `--metrics-port` (text format at /metrics)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedcmp.server.rounds import Phase


class CoordinatorMetrics:
    """The gauges and counters an operator alerts on; updated by the coordinator as rounds move."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.round = Gauge("fedcmp_round", "Current (or last committed) round", registry=self.registry)
        self.phase = Gauge("fedcmp_phase", "1 for the coordinator's current phase", ["phase"], registry=self.registry)
        self.clients = Gauge("fedcmp_registered_clients", "Registered client daemons", registry=self.registry)
        self.uploads = Counter("fedcmp_uploads_total", "Client uploads by outcome", ["outcome"],
                               registry=self.registry)
        self.upload_bytes = Counter("fedcmp_upload_bytes_total", "Bytes of accepted uploads", registry=self.registry)
        self.aggregation = Histogram("fedcmp_aggregation_seconds", "Strategy aggregation time per round",
                                     buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=self.registry)
        self.train_loss = Gauge("fedcmp_train_loss", "Sample-weighted client train loss of the last round",
                                registry=self.registry)
        self.val_loss = Gauge("fedcmp_val_loss", "Held-out loss of the global the last round started from",
                              registry=self.registry)

    def serve(self, port: int, host: str) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def set_phase(self, phase: Phase, round_index: int, registered: int) -> None:
        for each in Phase:
            self.phase.labels(phase=each.value).set(1.0 if each is phase else 0.0)
        self.round.set(round_index)
        self.clients.set(registered)

    def round_committed(self, row: dict) -> None:
        """A committed round's record: server fields at the top, client metric means under "metrics"."""
        self.aggregation.observe(row["aggregation_s"])
        for gauge, key in ((self.train_loss, "train_loss"), (self.val_loss, "val_loss")):
            if key in row["metrics"]:
                gauge.set(row["metrics"][key])
