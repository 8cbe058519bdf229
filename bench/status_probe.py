"""Times GetStatus calls against a coordinator, in a process of its own, for the system benchmark.

Calls GetStatus every `--interval` seconds until the coordinator says DONE (or stops answering
after having answered), and appends one line per call to `--out`: the call's seconds and the
phase it reported. Its own process, because in the benchmark's process the /proc sampler and
the WatchStatus reader would hold the GIL between the call and its timing.

    python bench/status_probe.py --server 127.0.0.1:50051 --interval 0.02 --out status.txt
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.common.wire import coordinator_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Call:
    seconds: float
    phase: str


def read_calls(path: Path) -> list[Call]:
    """The calls a probe wrote, less a last line it may not have finished."""
    if not path.exists():
        return []
    complete = path.read_text().rpartition("\n")[0]
    return [Call(float(seconds), phase) for seconds, phase in (line.split() for line in complete.splitlines())]


def probe(server: str, interval_s: float, out: Path) -> int:
    channel = grpc.insecure_channel(server, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = pb_grpc.CoordinatorStub(channel)
    answered = False
    with out.open("w") as sink:
        while True:
            start = time.perf_counter()
            try:
                status = stub.GetStatus(pb.StatusRequest(), timeout=30, wait_for_ready=not answered)
            except grpc.RpcError:
                return 0 if answered else 1  # gone after answering: the run ended
            sink.write(f"{time.perf_counter() - start:.6f} {status.phase}\n")
            sink.flush()
            answered = True
            if status.phase == "DONE":
                return 0
            time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="coordinator HOST:PORT")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between the end of a call and the next")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    return probe(args.server, args.interval, args.out)


if __name__ == "__main__":
    sys.exit(main())
