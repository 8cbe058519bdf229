"""The committed gRPC stubs match proto/, and a changed .proto is reported stale."""
from __future__ import annotations

import shutil
from pathlib import Path

from fedcmp.common.protogen import main, stale_stubs

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_fresh() -> None:
    assert stale_stubs(ROOT / "proto", ROOT / "common" / "wire") == []


def test_a_changed_proto_makes_the_stubs_stale(tmp_path) -> None:
    proto_root = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto_root)
    proto = proto_root / "fedcmp" / "v1" / "coordinator.proto"
    proto.write_text(proto.read_text().replace("message StatusRequest {}", "message StatusRequest { bool verbose = 1; }"))
    assert stale_stubs(proto_root, ROOT / "common" / "wire") == ["coordinator_pb2.py"]
    assert main(["--check", "--proto-root", str(proto_root), "--wire-dir", str(ROOT / "common" / "wire")]) == 1


def test_a_new_rpc_makes_the_service_stub_stale(tmp_path) -> None:
    proto_root = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto_root)
    proto = proto_root / "fedcmp" / "v1" / "coordinator.proto"
    proto.write_text(proto.read_text().replace(
        "service Coordinator {", "service Coordinator {\n  rpc Ping(StatusRequest) returns (StatusRequest);"))
    assert set(stale_stubs(proto_root, ROOT / "common" / "wire")) == {"coordinator_pb2.py", "coordinator_pb2_grpc.py"}
