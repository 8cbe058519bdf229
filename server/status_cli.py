"""`fedcmp-status`: show a coordinator's run — a table for people, `--json` for machines, `--watch` to follow.

A coordinator started with `--auth-tokens` answers only an operator's token (`--token-file`
holding the token of an `operator:NAME TOKEN` line), unless it runs with `--public-status`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from fedcmp.common.cliflags import add_common_flags
from fedcmp.common.constants import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from fedcmp.common.logs import setup_logging
from fedcmp.common.provenance import Backbones, short
from fedcmp.common.security import SecurityConfigError, bearer_metadata, channel_credentials
from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.common.wire import coordinator_pb2_grpc as pb_grpc

TABLE_METRICS = ("train_loss", "val_loss", "global_update_norm", "aggregation_s")


def status_dict(status: pb.Status) -> dict[str, Any]:
    return MessageToDict(status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def describe_backbones(backbones: pb.Backbones) -> str:
    return Backbones(backbones.vision_model, backbones.llm, backbones.vision_fingerprint,
                     backbones.llm_fingerprint).describe()


def render(status: pb.Status) -> str:
    eta = "unknown" if status.eta_s < 0 else f"{status.eta_s:.0f}s"
    lines = [f"phase {status.phase}   round {status.round}/{status.total_rounds}   global v{status.global_version}   "
             f"strategy {status.strategy}   eta {eta}   up {status.uptime_s:.0f}s",
             f"backbones: {describe_backbones(status.backbones) if status.HasField('backbones') else 'not fixed yet'}"]
    if not status.healthy:
        lines.append(f"UNHEALTHY: {status.health_message}")
    shown = "" if len(status.clients) == status.clients_total else f", first {len(status.clients)} shown"
    lines.append(f"clients ({status.clients_total}{shown}):")
    lines += [f"  {c.client_id:<20} {c.state:<11} {c.num_samples:>7} samples   seen {c.last_seen_s:.0f}s ago   "
              f"backbones {short(c.backbones.vision_fingerprint)}/{short(c.backbones.llm_fingerprint)}" + progress(c)
              for c in status.clients]
    if status.selected and status.phase == "TRAINING":
        lines.append(f"round {status.round}: {len(status.reported)}/{len(status.selected)} uploads in")
    if status.history:
        lines.append("round  clients  " + "".join(f"{name:>20}" for name in TABLE_METRICS) + "   seconds")
        for row in status.history:
            cells = "".join(f"{row.metrics[name]:>20.4f}" if name in row.metrics else f"{'-':>20}"
                            for name in TABLE_METRICS)
            lines.append(f"{row.round:>5}  {row.participants:>7}  {cells}   {row.duration_s:>7.1f}")
    for row in status.history:
        for client_id, reason in sorted(row.excluded.items()):
            lines.append(f"round {row.round}: left out {client_id}: {reason}")
    if status.final_metrics:
        lines.append("final: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(status.final_metrics.items())))
    return "\n".join(lines)


def progress(client: pb.ClientInfo) -> str:
    """A working client's last heartbeat: `   step 12/40 loss 2.3117 eta 31s`."""
    if client.state != "training" or not client.total_steps:
        return ""
    eta = "" if client.eta_s < 0 else f" eta {client.eta_s:.0f}s"
    return f"   step {client.step}/{client.total_steps} loss {client.last_loss:.4f}{eta}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedcmp-status", description=__doc__)
    parser.add_argument("--server", required=True, help="coordinator address HOST:PORT")
    parser.add_argument("--watch", action="store_true", help="print every change until the run is DONE")
    parser.add_argument("--json", action="store_true", help="JSON (one object per line with --watch)")
    parser.add_argument("--tls-ca", type=Path, help="CA of the coordinator's certificate (TLS)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate, when the coordinator requires mTLS")
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--token-file", type=Path, help="file holding an operator's bearer token")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the coordinator")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(log_format=args.log_format)
    show = (lambda s: json.dumps(status_dict(s))) if args.json else render
    try:
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None
        metadata = bearer_metadata(args.token_file) if args.token_file else ()
    except SecurityConfigError as error:
        print(f"fedcmp-status: {error}", file=sys.stderr)
        return EXIT_USAGE
    if metadata and credentials is None:
        print("fedcmp-status: WARNING: sending the operator token over PLAINTEXT; use TLS (--tls-ca)", file=sys.stderr)
    channel = grpc.secure_channel(args.server, credentials) if credentials else grpc.insecure_channel(args.server)
    with channel:
        stub = pb_grpc.CoordinatorStub(channel)
        try:
            if args.watch:
                for status in stub.WatchStatus(pb.StatusRequest(), wait_for_ready=True, timeout=None,
                                               metadata=metadata):
                    print(show(status) + ("" if args.json else "\n"), flush=True)
            else:
                print(show(stub.GetStatus(pb.StatusRequest(), timeout=args.timeout, metadata=metadata)))
        except grpc.RpcError as error:
            print(f"fedcmp-status: {args.server}: {error.code().name}: {error.details()}", file=sys.stderr)
            return EXIT_UNAVAILABLE
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
