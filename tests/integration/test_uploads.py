"""A hostile or unlucky client against a real coordinator on loopback: the upload path holds.

The coordinator and its gRPC server run in this process (on their own event loop thread, bound
to 127.0.0.1 on a free port); clients speak real gRPC to it, through raw stubs where the test
plays an attacker and through the client daemon where it plays an honest site.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import re
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import pytest
import torch

from fedcmp.client.daemon import ClientDaemon, ConnectionSettings, CoordinatorLink
from fedcmp.common.codec import (BlobLayout, decode_projector, encode_params, encode_projector, iter_chunks,
                                 receive_blob, sha256_hex)
from fedcmp.common.constants import MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from fedcmp.common.projector import projector_shapes
from fedcmp.common.provenance import Backbones
from fedcmp.common.recipe import Recipe
from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.common.wire import coordinator_pb2_grpc as pb_grpc
from fedcmp.server.rounds import Coordinator, Phase
from fedcmp.server import service
from fedcmp.common.framing import parse_upload_message
from fedcmp.server.service import STREAM_WINDOW_BYTES, build_server
from fedcmp.server.store import RunStore
from fedcmp.server.strategies import build_strategy

SHAPES = projector_shapes("mlp2x_gelu", vision_hidden=6, text_hidden=8)
SAMPLES = 32  # registered training examples; with local_steps 2 and batch 16 an upload may claim 1..32
BACKBONES = Backbones("micro", "micro", "1" * 64, "2" * 64)


class LoopbackCoordinator:
    """A coordinator and its gRPC server on 127.0.0.1, run on a private event loop thread."""

    def __init__(self, state_dir, window: int = STREAM_WINDOW_BYTES, **recipe_fields) -> None:
        self.window = window
        self.recipe = Recipe(**{"rounds": 1, "min_clients": 1, "local_steps": 2, "batch_size": 16,
                                "round_timeout_s": 60.0, **recipe_fields})
        self.store = RunStore(state_dir)
        record = self.store.load() if self.store.has_run() else self.store.create(self.recipe.to_json(), "fedavg")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.coordinator: Coordinator = self.call(self._start(record))
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length",
                                                                     MAX_MESSAGE_BYTES)])
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    async def _start(self, record) -> Coordinator:
        coordinator = Coordinator(self.recipe, self.store, build_strategy("fedavg", {}), record)
        self.server, port = build_server(coordinator, "127.0.0.1:0", stream_window_bytes=self.window)
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.run = asyncio.create_task(coordinator.run())
        return coordinator

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.channel.close()

        async def shutdown() -> None:
            self.run.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # finished before the loop closes
                await self.run
            await self.server.stop(0)

        self.call(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def register(self, client_id: str = "a") -> str:
        reply = self.stub.Register(pb.RegisterRequest(
            client_id=client_id, num_samples=SAMPLES, num_eval_samples=4, protocol_version=PROTOCOL_VERSION,
            vision_model=BACKBONES.vision_model, llm=BACKBONES.llm, vision_fingerprint=BACKBONES.vision_fingerprint,
            llm_fingerprint=BACKBONES.llm_fingerprint, projector=[pb.TensorSpec(name=name, shape=list(shape)) for name, shape in SHAPES.items()]))
        assert reply.accepted, reply.reason
        return reply.session_token

    def train_task(self, client_id: str, token: str) -> pb.Task:
        deadline = time.monotonic() + 30
        while True:
            task = self.stub.PollTask(pb.PollTaskRequest(client_id=client_id, session_token=token))
            if pb.Task.Kind.Name(task.kind) == "TRAIN":
                return task
            assert time.monotonic() < deadline, "no TRAIN task"

    def global_params(self, client_id: str, token: str, version: int) -> dict[str, torch.Tensor]:
        chunks = list(self.stub.DownloadProjector(pb.DownloadRequest(client_id=client_id, session_token=token,
                                                                     global_version=version)))
        return decode_projector(receive_blob((c.data for c in chunks), chunks[0].total_size, chunks[0].sha256))

    def wait_committed(self, round_index: int) -> None:
        deadline = time.monotonic() + 30
        while self.coordinator.record.committed_round < round_index:
            assert time.monotonic() < deadline, f"round {round_index} never committed"
            time.sleep(0.05)


@pytest.fixture
def loopback(tmp_path) -> Iterator[callable]:
    started: list[LoopbackCoordinator] = []

    def start(**recipe_fields) -> LoopbackCoordinator:
        started.append(LoopbackCoordinator(tmp_path / "state", **recipe_fields))
        return started[-1]

    yield start
    for each in started:
        each.stop()


def upload_messages(client_id: str, token: str, task: pb.Task, blob: bytes, num_samples: int = SAMPLES,
                    metrics: dict[str, float] | None = None, size: int | None = None,
                    pause: threading.Event | None = None) -> Iterator[pb.UploadMessage]:
    """A header, then 64-byte chunks; with `pause`, stops after the first chunk until it is set."""
    yield pb.UploadMessage(header=pb.UploadHeader(
        client_id=client_id, session_token=token, round=task.round, global_version=task.global_version,
        num_samples=num_samples, metrics=metrics or {}, size=len(blob) if size is None else size,
        sha256=sha256_hex(blob)))
    for index, chunk in enumerate(iter_chunks(blob, 64)):
        if index == 1 and pause is not None:
            assert pause.wait(timeout=30)
        yield pb.UploadMessage(chunk=bytes(chunk))


def shifted(params: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    return {key: tensor + value for key, tensor in params.items()}


def test_a_concurrent_nan_stream_cannot_poison_the_committed_global(loopback) -> None:
    server = loopback()
    token = server.register("a")
    task = server.train_task("a", token)
    start = server.global_params("a", token, task.global_version)
    honest = encode_projector(shifted(start, 0.25), "float32")
    poisoned = encode_projector(shifted(start, float("nan")), "float32")
    resume_honest = threading.Event()
    acks: dict[str, pb.UploadAck] = {}

    def send(name: str, messages) -> None:
        acks[name] = server.stub.UploadUpdate(messages)

    first = threading.Thread(target=send, args=("honest", upload_messages("a", token, task, honest,
                                                                          pause=resume_honest)))
    first.start()
    time.sleep(0.3)  # the honest stream is half-way
    second = threading.Thread(target=send, args=("poisoned", upload_messages("a", token, task, poisoned)))
    second.start()
    time.sleep(0.3)  # the poisoned stream is waiting (today: writing into the same temp file)
    resume_honest.set()
    first.join(30)
    second.join(30)
    assert acks["honest"].accepted and not acks["honest"].duplicate, acks["honest"].reason
    assert acks["poisoned"].duplicate or not acks["poisoned"].accepted
    server.wait_committed(1)
    committed = server.store.load_global(1)
    assert all(torch.isfinite(tensor).all() for tensor in committed.values())
    assert torch.allclose(committed["linear_1.bias"], start["linear_1.bias"] + 0.25)


@pytest.mark.parametrize("num_samples, metrics, reason", [
    (-5, {}, "num_samples -5 is outside 1..32"),
    (0, {}, "num_samples 0 is outside"),
    (10**12, {}, "num_samples 1000000000000 is outside"),
    (SAMPLES, {"round": 7.0}, "'round' is reserved"),
    (SAMPLES, {"duration_s": 0.0}, "'duration_s' is reserved"),
    (SAMPLES, {f"m{i}": 0.0 for i in range(70_000)}, "70000 metrics; at most 32"),
    (SAMPLES, {"train_loss\n": 0.0}, "metric name 'train_loss\\\\n' is not allowed"),
    (SAMPLES, {"x" * 65: 0.0}, "is not allowed"),
    (SAMPLES, {"train_loss": float("nan")}, "train_loss = nan is not finite"),
    # FedNova weighs n_k / tau_k: claiming fewer steps than the samples need, or more than the task, is refused
    (SAMPLES, {"steps": 1.0}, "num_samples 32 is outside 1..16 (the 1 steps made times the batch size 16)"),
    (SAMPLES, {"steps": 3.0}, "metric steps = 3.0 is not a whole number in 1..2 (the task's local steps)"),
    (SAMPLES, {"steps": 1.5}, "metric steps = 1.5 is not a whole number"),
    (SAMPLES, {"steps": 0.0}, "metric steps = 0.0 is not a whole number"),
])
def test_an_upload_header_out_of_bounds_is_refused_and_the_round_goes_on(loopback, num_samples, metrics,
                                                                         reason) -> None:
    server = loopback()
    token = server.register("a")
    task = server.train_task("a", token)
    params = shifted(server.global_params("a", token, task.global_version), 0.5)
    blob = encode_projector(params, "float32")
    ack = server.stub.UploadUpdate(upload_messages("a", token, task, blob, num_samples, metrics))
    assert not ack.accepted and reason in ack.reason.replace("\\", "\\\\"), ack.reason
    assert server.store.uploads(1) == [] and server.coordinator.phase is Phase.TRAINING
    ack = server.stub.UploadUpdate(upload_messages("a", token, task, blob, metrics={"train_loss": 1.0, "steps": 2.0}))
    assert ack.accepted, ack.reason
    server.wait_committed(1)
    committed = server.coordinator.record.history[0]
    assert set(committed) >= {"round", "participants", "duration_s"} and committed["metrics"] == {"train_loss": 1.0, "steps": 2.0}


@pytest.mark.parametrize("refused_upload", ["header", "contents"])
def test_a_refused_client_is_not_handed_the_same_task_again_and_the_round_closes_without_it(loopback,
                                                                                          refused_upload) -> None:
    """Issue 12: a client whose upload was refused got TRAIN again at once and re-uploaded in a tight loop."""
    server = loopback(min_clients=2, heartbeat_interval_s=0.5, client_timeout_s=5.0)
    tokens = {client_id: server.register(client_id) for client_id in ("a", "b")}
    tasks = {client_id: server.train_task(client_id, token) for client_id, token in tokens.items()}
    params = server.global_params("a", tokens["a"], tasks["a"].global_version)
    if refused_upload == "header":
        bad = upload_messages("a", tokens["a"], tasks["a"], encode_projector(shifted(params, 0.5), "float32"),
                              num_samples=SAMPLES * 10)
    else:
        bad = upload_messages("a", tokens["a"], tasks["a"], encode_projector(shifted(params, float("nan")), "float32"))
    ack = server.stub.UploadUpdate(bad)
    assert not ack.accepted
    task = server.stub.PollTask(pb.PollTaskRequest(client_id="a", session_token=tokens["a"]))
    assert pb.Task.Kind.Name(task.kind) == "WAIT" and "was refused" in task.message, task
    began = time.monotonic()
    ack = server.stub.UploadUpdate(upload_messages("b", tokens["b"], tasks["b"],
                                                   encode_projector(shifted(params, 0.5), "float32")))
    assert ack.accepted, ack.reason
    server.wait_committed(1)  # without waiting for "a" until the round's deadline (60 s)
    assert time.monotonic() - began < 10
    assert server.coordinator.record.history[0]["clients"] == ["b"]


@pytest.mark.parametrize("dtype, reason", [
    (torch.float16, r"size of the projector in a 2-byte dtype \(F16"),
    (torch.int64, r"dtype I64 is refused: this run's wire dtype is float32"),
    (torch.float8_e4m3fn, r"size of the projector in a 1-byte dtype \(.*F8_E4M3"),
])
def test_foreign_dtypes_and_sizes_are_refused_with_a_reason(loopback, dtype, reason) -> None:
    server = loopback()
    token = server.register("a")
    task = server.train_task("a", token)
    params = server.global_params("a", token, task.global_version)
    blob = encode_params({key: tensor.to(dtype) for key, tensor in params.items()})
    ack = server.stub.UploadUpdate(upload_messages("a", token, task, blob))
    assert not ack.accepted and re.search(reason, ack.reason), ack.reason
    huge = server.stub.UploadUpdate(upload_messages("a", token, task, blob, size=2**50))
    assert not huge.accepted and f"announced size {2**50} bytes is not the" in huge.reason
    assert not server.store.upload_dir(1).exists() or list(server.store.upload_dir(1).iterdir()) == []


class FullDisk(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def honest_daemon(server: LoopbackCoordinator, recipe: Recipe) -> ClientDaemon:
    daemon = ClientDaemon(CoordinatorLink(ConnectionSettings(server.address, reconnect_budget_s=30)), "a")
    daemon.session = SimpleNamespace(recipe=recipe, num_train_samples=SAMPLES, num_val_samples=4,
                                     signature=lambda: SHAPES, model=SimpleNamespace(vision_hidden=6, text_hidden=8))
    daemon.backbones = BACKBONES
    daemon.register()
    return daemon


def test_a_full_disk_makes_the_client_back_off_and_retry(loopback, monkeypatch, caplog) -> None:
    server = loopback()
    failures = []
    real_spill_file = server.store._spill_file

    def spill_file(fd: int):
        if len(failures) < 2:
            failures.append(fd)
            __import__("os").close(fd)
            return FullDisk()
        return real_spill_file(fd)

    monkeypatch.setattr(server.store, "_spill_file", spill_file)
    daemon = honest_daemon(server, server.recipe)
    task = server.train_task("a", daemon.token)
    params = shifted(daemon.download(task.global_version), 0.5)
    daemon.upload(task, params, {"train_loss": 1.0, "samples": float(SAMPLES)})
    assert len(failures) == 2
    assert caplog.text.count("RESOURCE_EXHAUSTED") >= 2 and "No space left on device" in caplog.text
    server.wait_committed(1)  # the coordinator lived on and committed the retried upload
    assert torch.allclose(server.store.load_global(1)["linear_2.bias"], params["linear_2.bias"])
    assert not list(server.store.root.rglob("*.part"))
    daemon.link.close()


def test_bfloat16_on_the_wire_both_ways_is_exact_for_bfloat16_values(loopback) -> None:
    server = loopback(wire_dtype="bfloat16")
    daemon = honest_daemon(server, server.recipe)
    task = server.train_task("a", daemon.token)
    start = daemon.download(task.global_version)
    initial = server.store.load_global(0)
    assert all(torch.equal(start[key], initial[key].to(torch.bfloat16).float()) for key in initial)
    trained = {key: (tensor + 0.5).to(torch.bfloat16).float() for key, tensor in start.items()}
    daemon.upload(task, trained, {"train_loss": 1.0, "samples": float(SAMPLES)})
    server.wait_committed(1)
    committed = server.store.load_global(1)  # FedAvg of one client: W + (W_1 - W), its upload up to float32 rounding
    assert all(torch.allclose(committed[key], trained[key], rtol=1e-6, atol=1e-6) for key in trained)
    [row] = server.coordinator.record.history
    assert row["participants"] == 1
    assert BlobLayout.of(SHAPES, "bfloat16").admits_size(server.store.encoded_global(1, "bfloat16").size)
    daemon.link.close()


def test_a_poisoned_spilled_upload_is_dropped_on_resume_and_the_client_trains_again(tmp_path, loopback,
                                                                                      caplog) -> None:
    """What an older coordinator spilled (num_samples -5) once crashed every --resume."""
    server = loopback()
    token = server.register("a")
    task = server.train_task("a", token)
    server.stop()
    path = server.store.upload_path(1, "a")
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_projector(shifted(server.store.load_global(0), 1.0), "float32"))
    path.with_suffix(".json").write_text('{"client_id": "a", "round": 1, "num_samples": -5, "metrics": {}}')

    resumed = loopback()
    daemon = honest_daemon(resumed, resumed.recipe)
    task = resumed.train_task("a", daemon.token)
    params = shifted(daemon.download(task.global_version), 0.5)
    daemon.upload(task, params, {"train_loss": 1.0, "samples": float(SAMPLES)})
    resumed.wait_committed(1)
    assert "dropped the spilled upload a of round 1" in caplog.text
    assert torch.allclose(resumed.store.load_global(1)["linear_1.bias"], params["linear_1.bias"])
    daemon.link.close()


def test_status_answers_while_an_upload_is_stuck_on_disk(loopback, monkeypatch) -> None:
    """Disk work runs off the event loop: a write that hangs does not hang the other RPCs."""
    server = loopback()
    writing, release = threading.Event(), threading.Event()
    real_spill_file = server.store._spill_file

    class StuckDisk:
        def __init__(self, real) -> None:
            self.real = real

        def write(self, data) -> int:
            writing.set()
            assert release.wait(timeout=30)
            return self.real.write(data)

        def __getattr__(self, name: str):
            return getattr(self.real, name)

    monkeypatch.setattr(server.store, "_spill_file", lambda fd: StuckDisk(real_spill_file(fd)))
    token = server.register("a")
    task = server.train_task("a", token)
    blob = encode_projector(shifted(server.global_params("a", token, task.global_version), 0.5), "float32")
    acks = []
    uploader = threading.Thread(target=lambda: acks.append(server.stub.UploadUpdate(
        upload_messages("a", token, task, blob))))
    uploader.start()
    assert writing.wait(timeout=30)
    status = server.stub.GetStatus(pb.StatusRequest(), timeout=10)  # would time out if the write held the loop
    assert status.phase == "TRAINING" and list(status.selected) == ["a"] and not status.reported
    release.set()
    uploader.join(timeout=30)
    assert acks and acks[0].accepted, acks


def test_the_server_fixes_each_streams_window_and_uploads_pass_through_the_smallest(loopback, monkeypatch) -> None:
    """No bandwidth-delay probing (it let the window, and what a stream parks in the server, grow)."""
    options = []
    real_server = grpc.aio.server
    monkeypatch.setattr(grpc.aio, "server", lambda **kwargs: options.append(kwargs["options"]) or real_server(**kwargs))
    server = loopback(window=64 * 1024)
    assert {("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 64 * 1024)} <= set(options[0])
    daemon = honest_daemon(server, server.recipe)
    task = server.train_task("a", daemon.token)
    params = shifted(daemon.download(task.global_version), 0.5)
    daemon.upload(task, params, {"train_loss": 1.0, "samples": float(SAMPLES)})
    server.wait_committed(1)
    assert all(torch.allclose(server.store.load_global(1)[key], params[key]) for key in params)
    daemon.link.close()


def test_upload_chunks_arrive_as_views_of_the_received_bytes(loopback, monkeypatch) -> None:
    """The server reads UploadUpdate with its own parser: the header through protobuf, chunks in place."""
    parsed = []

    def parse(raw: bytes):
        parsed.append(type(message := parse_upload_message(raw)))
        return message

    monkeypatch.setitem(service.VIEWED, "UploadUpdate", parse)
    server = loopback()
    token = server.register("a")
    task = server.train_task("a", token)
    blob = encode_params(shifted(server.global_params("a", token, task.global_version), 0.5))
    ack = server.stub.UploadUpdate(upload_messages("a", token, task, blob, metrics={"steps": 2.0}))
    assert ack.accepted, ack.reason
    assert parsed == [pb.UploadMessage] + [memoryview] * -(-len(blob) // 64)
