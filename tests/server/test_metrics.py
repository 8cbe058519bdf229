"""Coordinator metrics: round durations and per-client series read at scrape time."""
from __future__ import annotations

import time

from fedcmp.common.projector import projector_shapes
from fedcmp.common.recipe import Recipe
from fedcmp.server.liveness import Progress
from fedcmp.server.metrics import CoordinatorMetrics
from fedcmp.server.rounds import Coordinator
from fedcmp.server.store import RunStore
from fedcmp.server.strategies import build_strategy


def test_per_client_series_follow_the_coordinator_and_rounds_are_timed(tmp_path) -> None:
    recipe, metrics = Recipe(), CoordinatorMetrics()
    store = RunStore(tmp_path)
    coordinator = Coordinator(recipe, store, build_strategy("fedavg", {}), store.create(recipe.to_json(), "fedavg"),
                              metrics)
    metrics.track_clients(coordinator)
    sample = metrics.registry.get_sample_value
    assert sample("fedcmp_client_last_seen_seconds", {"client": "a"}) is None
    assert coordinator.register("a", "a-process", projector_shapes("mlp2x_gelu", 6, 8), 10, 1).accepted
    coordinator.clients["a"].last_seen -= 42.0
    assert sample("fedcmp_client_last_seen_seconds", {"client": "a"}) >= 42.0
    assert sample("fedcmp_client_state", {"client": "a", "state": "idle"}) == 1.0
    assert sample("fedcmp_client_task_step", {"client": "a"}) is None  # idle: no task progress
    record = coordinator.clients["a"]
    record.state = "training"
    record.progress = Progress(round=1, step=4, total_steps=10, started=time.monotonic() - 8.0)
    assert (sample("fedcmp_client_task_step", {"client": "a"}), sample("fedcmp_client_task_total_steps", {"client": "a"})) == \
        (4, 10)
    assert 12.0 <= sample("fedcmp_client_task_eta_seconds", {"client": "a"}) < 13.0  # 2 s a step, 6 to go
    metrics.round_committed({"aggregation_s": 0.5, "duration_s": 70.0, "metrics": {"train_loss": 1.5}})
    assert sample("fedcmp_round_duration_seconds_count") == 1 and sample("fedcmp_round_duration_seconds_sum") == 70
    assert sample("fedcmp_last_round_duration_seconds") == 70 and sample("fedcmp_train_loss") == 1.5
