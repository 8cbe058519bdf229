"""Prometheus metrics of a client daemon, served on its `--metrics-port` (text format at /metrics)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from fedcmp.common.prometheus import new_registry, serve_metrics


class ClientMetrics:
    """Where this client is in the run and in its local round; updated by the daemon and the progress log."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        self.round = Gauge("fedcmp_client_round", "Round of the current (or last) task", registry=self.registry)
        self.step = Gauge("fedcmp_client_step", "Optimizer steps done in the current round", registry=self.registry)
        self.total_steps = Gauge("fedcmp_client_total_steps", "Optimizer steps the current round asks for",
                                 registry=self.registry)
        self.loss = Gauge("fedcmp_client_train_loss", "Train loss of the last step", registry=self.registry)
        self.eta = Gauge("fedcmp_client_round_eta_seconds", "Estimated seconds left in the current round",
                         registry=self.registry)
        self.rounds = Counter("fedcmp_client_rounds_trained_total", "Rounds trained and uploaded",
                              registry=self.registry)

    def serve(self, port: int, host: str) -> None:
        serve_metrics(self.registry, port, host)
