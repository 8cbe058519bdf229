"""`fedcmp-sim` reproduces a real coordinator + client run on loopback for the same seed."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fedcmp.common.codec import load_params_file
from fedcmp.common.recipe import Recipe
from fedcmp.sim.engine import Federation, Simulator


def test_simulated_run_equals_the_networked_run(processes, two_client_data: Path, tmp_path: Path, micro_zoo) -> None:
    state = tmp_path / "state"
    server, address = processes.server(state, "--rounds", "2", "--min-clients", "2", "--strategy", "fedcmp",
                                       "--local-steps", "4", "--seed", "5")
    clients = [processes.client(f"client_{i}", address, two_client_data / f"client_{i}") for i in range(2)]
    assert [processes.wait(c) for c in clients] == [0, 0]
    assert processes.wait(server) == 0
    networked = load_params_file(state / "global" / "v2.safetensors")
    history = json.loads((state / "run.json").read_text())["history"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the clients ran with --threads 1: same kernels, same float sums
    try:
        recipe = Recipe(rounds=2, min_clients=2, strategy="fedcmp", local_steps=4, seed=5)
        result = Simulator(Federation.open(two_client_data, recipe, micro_zoo.root.parent), recipe).run()
    finally:
        torch.set_num_threads(threads)

    assert networked.keys() == result.global_params.keys()
    for key in networked:
        assert torch.equal(networked[key], result.global_params[key]), key
    for real_row, sim_row in zip(history, result.rounds, strict=True):
        assert real_row["metrics"]["train_loss"] == sim_row["train_loss"]
        assert real_row["metrics"]["val_loss"] == sim_row["val_loss"]
    assert "test_nll" in result.final and "test_retrieval" in result.final
