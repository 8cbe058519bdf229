"""Fault test on real processes: a client freezes mid-round under the default quorum; the coordinator
marks it gone and finishes the round without it; a second process under a live client's id is
refused; the frozen client's restart takes its id back and the run finishes with both."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import grpc

from fedcmp.common.constants import PROTOCOL_VERSION
from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.common.wire import coordinator_pb2_grpc as pb_grpc


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def client_info(address: str, client_id: str) -> pb.ClientInfo | None:
    """The coordinator's view of one client, from the status RPC (in-process: quick enough to poll)."""
    with grpc.insecure_channel(address) as channel:
        status = pb_grpc.CoordinatorStub(channel).GetStatus(pb.StatusRequest(), timeout=30)
    return next((c for c in status.clients if c.client_id == client_id), None)


def test_a_frozen_client_is_gone_and_its_restart_takes_its_id_back(processes, two_client_data: Path,
                                                                     tmp_path: Path) -> None:
    state = tmp_path / "state"
    server, address = processes.server(state, "--rounds", "2", "--min-clients", "2", "--local-steps", "150",
                                       "--heartbeat-interval", "0.5", "--client-timeout", "6", "--linger", "10")
    steady = processes.client("client_0", address, two_client_data / "client_0")
    frozen = processes.client("client_1", address, two_client_data / "client_1")
    # Heartbeats carry step progress into status: freeze client_1 once it is training round 1 (round 2
    # then waits for two live clients, so client_0 stays connected while the test probes its id).
    wait_for(lambda: (info := client_info(address, "client_1")) is not None and info.step > 0, 240,
             "client_1 to report training steps")
    info = client_info(address, "client_1")
    assert (info.state, info.round, info.total_steps) == ("training", 1, 150), info
    shapes = json.loads((state / "run.json").read_text())["projector_shapes"]
    backbones = client_info(address, "client_0").backbones
    frozen.send_signal(signal.SIGSTOP)
    wait_for(lambda: client_info(address, "client_1").state == "gone", 60, "client_1 to be gone")

    # A second process under client_0's (live) id is refused, told how to choose an id and when to retry.
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.CoordinatorStub(channel).Register(pb.RegisterRequest(
            client_id="client_0", instance_id="another-process", num_samples=5, protocol_version=PROTOCOL_VERSION,
            projector=[pb.TensorSpec(name=name, shape=shape) for name, shape in shapes.items()],
            vision_model=backbones.vision_model, llm=backbones.llm, vision_fingerprint=backbones.vision_fingerprint,
            llm_fingerprint=backbones.llm_fingerprint),
            timeout=30)
    assert not reply.accepted and "--client-id" in reply.reason and reply.retry_after_s > 0

    frozen.send_signal(signal.SIGKILL)
    frozen.wait()
    restarted = processes.client("client_1-again", address, two_client_data / "client_1")
    assert [processes.wait(c) for c in (steady, restarted)] == [0, 0], restarted.log_path.read_text()[-2000:]
    assert processes.wait(server) == 0
    record = json.loads((state / "run.json").read_text())
    assert record["done"]
    assert [row["clients"] for row in record["history"]] == [["client_0"], ["client_0", "client_1"]]
    assert "client_1 is gone" in server.log_path.read_text()
