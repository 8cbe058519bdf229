"""The daemon against a coordinator that refuses every upload yet hands the task out again: no tight loop.

The coordinator is a stand-in gRPC server on 127.0.0.1 (a free port, in this process) that
answers TRAIN for round 1 until the test's window closes, then DONE, and refuses every upload;
the daemon is the real one, with a session that "trains" instantly. Issue 12: a client in
this situation re-uploaded ~23,000 times in one benchmark run.
"""
from __future__ import annotations

import time
from concurrent import futures
from types import SimpleNamespace

import grpc
import torch

from fedcmp.client.daemon import ClientDaemon, ConnectionSettings, CoordinatorLink, RefusalBackoff
from fedcmp.common.codec import encode_projector, iter_chunks, sha256_hex
from fedcmp.common.projector import init_projector_params, projector_shapes
from fedcmp.common.provenance import Backbones
from fedcmp.common.recipe import Recipe
from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.common.wire import coordinator_pb2_grpc as pb_grpc

WINDOW_S = 3.0


class RefusingCoordinator(pb_grpc.CoordinatorServicer):
    """TRAIN round 1 (global v0) to every poll for WINDOW_S after registration, then DONE; refuses every upload."""

    def __init__(self) -> None:
        self.blob = bytes(encode_projector(init_projector_params("mlp2x_gelu", 6, 8, 0), "float32"))
        self.uploads = 0
        self.done_at = float("inf")

    def Register(self, request, context):
        self.done_at = time.monotonic() + WINDOW_S
        return pb.RegisterReply(accepted=True, session_token="t")

    def PollTask(self, request, context):
        if time.monotonic() >= self.done_at:
            return pb.Task(kind=pb.Task.DONE)
        return pb.Task(kind=pb.Task.TRAIN, round=1, global_version=0, local_steps=1)

    def Heartbeat(self, request, context):
        return pb.HeartbeatAck()

    def DownloadProjector(self, request, context):
        for chunk in iter_chunks(self.blob):
            yield pb.BlobChunk(data=bytes(chunk), total_size=len(self.blob), sha256=sha256_hex(self.blob))

    def UploadUpdate(self, request_iterator, context):
        for _ in request_iterator:
            pass
        self.uploads += 1
        return pb.UploadAck(accepted=False, reason="upload refused: num_samples 100 is outside 1..16")


def test_a_refused_upload_is_not_sent_again_in_a_tight_loop() -> None:
    coordinator = RefusingCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_CoordinatorServicer_to_server(coordinator, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    link = CoordinatorLink(ConnectionSettings(f"127.0.0.1:{port}", reconnect_budget_s=10))
    recipe = Recipe(heartbeat_interval_s=5.0)
    session = SimpleNamespace(
        recipe=recipe, num_train_samples=100, num_val_samples=2, model=SimpleNamespace(vision_hidden=6, text_hidden=8),
        signature=lambda: projector_shapes("mlp2x_gelu", 6, 8), evaluate=lambda params: {"val_loss": 1.0},
        data_metrics=lambda: {}, train_round=lambda params, index, steps, on_step=None: (
            {key: value + 1.0 for key, value in params.items()}, {"train_loss": 1.0, "samples": 100.0}))
    try:
        ClientDaemon(link, "site").run(session, Backbones("micro", "micro", "a" * 64, "b" * 64))
    finally:
        link.close()
        server.stop(0)
    # Backoff 0.5, 1, 2 s between the attempts: at most 4 in the 3 s window (a tight loop makes hundreds).
    assert 1 <= coordinator.uploads <= 4, coordinator.uploads


def test_the_backoff_doubles_for_the_same_task_up_to_its_cap_and_resets_for_a_new_one() -> None:
    backoff = RefusalBackoff(first_s=0.5, max_s=2.0)
    first = pb.Task(kind=pb.Task.TRAIN, round=3, global_version=2)
    assert backoff.delay_s(first) == 0.0
    delays = []
    for _ in range(4):
        backoff.refused(first)
        delays.append(backoff.delay_s(first))
    assert delays == [0.5, 1.0, 2.0, 2.0]
    assert backoff.delay_s(pb.Task(kind=pb.Task.TRAIN, round=4, global_version=3)) == 0.0
    backoff.refused(pb.Task(kind=pb.Task.TRAIN, round=4, global_version=3))
    assert backoff.delay_s(pb.Task(kind=pb.Task.TRAIN, round=4, global_version=3)) == 0.5
