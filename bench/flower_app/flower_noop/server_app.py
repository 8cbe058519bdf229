"""ServerApp: Flower's own FedAvg over `nodes` no-op clients for `rounds` rounds, no evaluation.

Each round's start (just before the train messages are built) and end (the aggregate is back)
are appended as a JSON line to `timing-file`, so the benchmark reads round times the same way
it reads them from fedcmp's server.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flower_noop.projector import projector_arrays

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round's training starts and when its aggregate is ready."""

    def __init__(self, timing_file: str, nodes: int) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
        self.timing_file = timing_file
        self.started: dict[int, float] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.started[server_round] = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        row = {"round": server_round, "start": self.started[server_round], "end": time.time(),
               "replies": len(replies)}
        with open(self.timing_file, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        return arrays, metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    arrays = projector_arrays(str(config["projector-type"]), int(config["vision-hidden"]), int(config["text-hidden"]))
    strategy = TimedFedAvg(str(config["timing-file"]), int(config["nodes"]))
    strategy.start(grid=grid, initial_arrays=ArrayRecord(arrays), num_rounds=int(config["rounds"]))
