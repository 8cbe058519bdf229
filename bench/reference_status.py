"""An idle status server for the system benchmark: the machine's own floor under a status call.

Serves GetStatus with the coordinator's own status-port code (server/status_endpoint.py) in a
process that does nothing else, answering one fixed status. The benchmark's probe times it in
the same loop as the coordinator's ports, so a tail this server shows too comes from the load
the machine carries (the clients and the server on the same cores, and any other work), not
from the coordinator: no coordinator work can delay it.

    python bench/reference_status.py --port-file reference.port
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.server.status_endpoint import StatusEndpoint

REFERENCE_STATUS = pb.Status(phase="TRAINING", round=1, strategy="reference")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", type=Path, required=True, help="the bound port is written here")
    args = parser.parse_args(argv)
    endpoint = StatusEndpoint("127.0.0.1:0")
    endpoint.publish(REFERENCE_STATUS)
    port = endpoint.start()
    args.port_file.write_text(f"{port}\n")
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    endpoint.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
