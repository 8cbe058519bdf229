"""Times GetStatus calls against a coordinator, in a process of its own, for the system benchmark.

Calls GetStatus and then the standard health check every `--interval` seconds until the
coordinator says DONE (or stops answering after having answered), and appends one line per
call to `--out`: the call's seconds, which call ("status", "health", "status_port" or
"reference") and the phase the last status reported. The health check is served by the same event loop but builds
nothing: its latency is the loop's and the machine's share of a status call's. With
`--status-port-server` (the coordinator's `--status-port`), GetStatus is also timed there
after the other two, and with `--reference-server` (bench/reference_status.py, an idle process
answering a fixed status) GetStatus there last: the floor the machine's load puts under any
call. Its own process, because in the benchmark's process the /proc sampler and
the WatchStatus reader would hold the GIL between a call and its timing.

    python bench/status_probe.py --server 127.0.0.1:50051 [--status-port-server 127.0.0.1:50052] \
        [--reference-server 127.0.0.1:50053] --interval 0.02 --out status.txt
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.common.wire import coordinator_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Call:
    seconds: float
    kind: str  # "status", "health", "status_port" or "reference"
    phase: str  # of the coordinator, as the last status said


def read_calls(path: Path) -> list[Call]:
    """The calls a probe wrote, less a last line it may not have finished."""
    if not path.exists():
        return []
    complete = path.read_text().rpartition("\n")[0]
    return [Call(float(seconds), kind, phase) for seconds, kind, phase in map(str.split, complete.splitlines())]


def probe(server: str, interval_s: float, out: Path, status_port_server: str | None = None,
          reference_server: str | None = None) -> int:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    channel = grpc.insecure_channel(server, options=options)
    stub = pb_grpc.CoordinatorStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    extra = {kind: pb_grpc.CoordinatorStub(grpc.insecure_channel(address, options=options))
             for kind, address in (("status_port", status_port_server), ("reference", reference_server)) if address}
    answered = False
    with out.open("w") as sink:
        while True:
            try:
                start = time.perf_counter()
                status = stub.GetStatus(pb.StatusRequest(), timeout=30, wait_for_ready=not answered)
                status_s = time.perf_counter() - start
                answered = True
                start = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                health_s = time.perf_counter() - start
                for kind, other in extra.items():
                    start = time.perf_counter()
                    other.GetStatus(pb.StatusRequest(), timeout=30)
                    sink.write(f"{time.perf_counter() - start:.6f} {kind} {status.phase}\n")
            except grpc.RpcError:
                return 0 if answered else 1  # gone after answering: the run ended
            sink.write(f"{status_s:.6f} status {status.phase}\n{health_s:.6f} health {status.phase}\n")
            sink.flush()
            if status.phase == "DONE":
                return 0
            time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="coordinator HOST:PORT")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between the end of a call and the next")
    parser.add_argument("--status-port-server", help="the coordinator's --status-port as HOST:PORT, timed too")
    parser.add_argument("--reference-server", help="an idle bench/reference_status.py as HOST:PORT, timed last")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    return probe(args.server, args.interval, args.out, args.status_port_server, args.reference_server)


if __name__ == "__main__":
    sys.exit(main())
