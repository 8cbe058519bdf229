"""`torchrun --nproc-per-node 2 -m fedcmp.client` is one client: rank 0 talks to the coordinator,
both ranks train, and the upload is the update one process makes with the same effective batch.
The same holds across two torchrun "nodes" (two agents on 127.0.0.1): with a static rendezvous,
where the other node's `--server` is never contacted, and with an elastic (c10d) one, where either
node may get rank 0 and both are handed the coordinator. When rank 0 fails between rounds (here:
no coordinator), it tells the other ranks to stop."""
from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from fedcmp.client.trainer import LocalSession
from fedcmp.common.codec import load_params_file
from fedcmp.common.constants import EXIT_UNAVAILABLE
from fedcmp.common.recipe import load_recipe

# gloo on the loopback interface; one intra-op thread per rank (2 ranks on a small machine).
RANK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun_client(nproc: int, nnodes: int = 1, node_rank: int = 0, port: int | None = None,
                     rdzv_id: str | None = None) -> list[str]:
    """torchrun on 127.0.0.1 (node `node_rank` of `nnodes`) around `python -m fedcmp.client`.
    Static rendezvous (no `rdzv_id`, at --master-addr/--master-port): node 0 hosts rank 0, the one
    that talks to the coordinator. Elastic c10d rendezvous (`rdzv_id`, the store at 127.0.0.1:`port`):
    `node_rank` does not apply; the agents are ranked by (--local-addr, pid), so any node may get rank 0."""
    port = port or _free_port()
    rendezvous = (["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
                   "--local-addr", "127.0.0.1"] if rdzv_id is not None else
                  ["--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)])
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            *rendezvous, "-m", "fedcmp.client"]


def _sgd_recipe(tmp_path: Path) -> Path:
    # SGD: its update scales with the gradient (Adam's would hide a gradient off by the rank count);
    # FedProx's term is added after the all-reduce, once per rank. 6 examples per step: 3 per rank,
    # forwarded 2 + 1 (--micro-batch-size 2).
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"rounds": 1, "min_clients": 1, "strategy": "fedavg", "local_steps": 3,
                                      "seed": 5, "optimizer": "sgd", "lr": 2.0, "batch_size": 6,
                                      "proximal_mu": 0.5}))
    return config


def _client_flags(data: Path, cache_dir: Path) -> list[str]:
    return ["--data", str(data), "--cache-dir", str(cache_dir), "--threads", "1", "--no-progress",
            "--micro-batch-size", "2"]


def test_two_rank_client_uploads_the_one_process_update(processes, two_client_data: Path, tmp_path: Path,
                                                         micro_zoo) -> None:
    _check_one_process_update(processes, two_client_data, tmp_path, micro_zoo,
                              lambda address, flags: [[*_torchrun_client(2), "--server", address, *flags]])


def test_client_on_two_nodes_uploads_the_one_process_update(processes, two_client_data: Path, tmp_path: Path,
                                                             micro_zoo) -> None:
    # Two torchrun agents, one rank each, as two nodes would start them. Node 1 is handed a coordinator
    # address where nothing listens: only rank 0 (node 0) ever talks to the coordinator.
    port = _free_port()

    def nodes(address: str, flags: list[str]) -> list[list[str]]:
        return [[*_torchrun_client(1, nnodes=2, node_rank=node, port=port),
                 "--server", address if node == 0 else f"127.0.0.1:{_free_port()}", *flags] for node in (0, 1)]

    _check_one_process_update(processes, two_client_data, tmp_path, micro_zoo, nodes)


def test_client_on_two_nodes_with_elastic_rendezvous_uploads_the_one_process_update(
        processes, two_client_data: Path, tmp_path: Path, micro_zoo) -> None:
    # Two torchrun agents, one rank each, meeting at a c10d rendezvous on 127.0.0.1. Both infer that they
    # host its store (the endpoint is a loopback address); the second one's bind fails and torch retries
    # it as a client of the first. Either node may get rank 0, so both are handed the coordinator.
    port = _free_port()

    def nodes(address: str, flags: list[str]) -> list[list[str]]:
        return [[*_torchrun_client(1, nnodes=2, port=port, rdzv_id="fedcmp-two-nodes"), "--server", address, *flags]
                for _ in (0, 1)]

    _check_one_process_update(processes, two_client_data, tmp_path, micro_zoo, nodes)


def _check_one_process_update(processes, two_client_data: Path, tmp_path: Path, micro_zoo,
                              commands: Callable[[str, list[str]], list[list[str]]]) -> None:
    """Start the processes `commands(coordinator address, client flags)` lists against a coordinator of
    the SGD recipe; each must exit 0, one client register, and the committed global be one process's update."""
    config = _sgd_recipe(tmp_path)
    state = tmp_path / "state"
    server, address = processes.server(state, "--config", str(config))
    data = two_client_data / "client_0"
    launched = [processes.launch(f"client{index}", argv, env=RANK_ENV)
                for index, argv in enumerate(commands(address, _client_flags(data, micro_zoo.root.parent)))]
    for process in launched:
        assert processes.wait(process) == 0, process.log_path.read_text()[-3000:]
    assert processes.wait(server) == 0
    registrations = [line for line in server.log_path.read_text().splitlines() if "registered client_" in line]
    assert len(registrations) == 1, registrations  # one logical client, whichever rank 0 it had
    _assert_one_process_update(load_params_file(state / "global" / "v1.safetensors"), config, data, micro_zoo)


def _assert_one_process_update(uploaded: dict[str, torch.Tensor], config: Path, data: Path, micro_zoo) -> None:
    """`uploaded` (FedAvg of one client: its upload) moved the projector as one process's round does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = LocalSession.open(data, load_recipe(config), client_id="client_0", cache_dir=micro_zoo.root.parent)
        start = single.model.projector_params()
        expected, _ = single.train_round(start, round_index=0, local_steps=3)
    finally:
        torch.set_num_threads(threads)
    for key in expected:
        update, expected_update = uploaded[key] - start[key], expected[key] - start[key]
        assert expected_update.abs().max() > 1e-3, key  # the round moved the projector
        torch.testing.assert_close(update, expected_update, rtol=1e-4, atol=1e-6)


def test_every_rank_exits_when_rank_0_cannot_reach_the_coordinator(processes, two_client_data: Path) -> None:
    # The two ranks started by hand with torchrun's environment, to see each one's exit: torchrun
    # would stop rank 1 itself once rank 0 failed, but not on another node.
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", **RANK_ENV}
    argv = [sys.executable, "-m", "fedcmp.client", "--server", f"127.0.0.1:{_free_port()}",
            "--data", str(two_client_data / "client_0"), "--threads", "1", "--no-progress", "--reconnect-budget", "1"]
    ranks = [processes.launch(f"rank{rank}", argv, env={**rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in (0, 1)]
    assert processes.wait(ranks[0]) == EXIT_UNAVAILABLE, ranks[0].log_path.read_text()[-3000:]
    assert "unreachable" in ranks[0].log_path.read_text()
    assert processes.wait(ranks[1], timeout=120) == 0, ranks[1].log_path.read_text()[-3000:]  # told to stop
