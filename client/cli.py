"""`fedcmp-client`: join a coordinator with a local LLaVA-format dataset and train until DONE."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from fedcmp.client.daemon import ClientDaemon, ConnectionSettings, CoordinatorLink, CoordinatorUnreachable, RegistrationRefused
from fedcmp.client.fingerprint import FingerprintError, fingerprint_backbones
from fedcmp.client.metrics import ClientMetrics
from fedcmp.client.progress import TrainingProgress
from fedcmp.common.cliflags import add_common_flags
from fedcmp.common.constants import (EXIT_OK, EXIT_REFUSED, EXIT_STOPPED, EXIT_UNAVAILABLE, EXIT_USAGE,
                                     RECONNECT_BUDGET_S)
from fedcmp.common.logs import setup_logging
from fedcmp.common.security import SecurityConfigError, bearer_metadata, channel_credentials

log = logging.getLogger("fedcmp.client")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedcmp-client", description=__doc__)
    parser.add_argument("--server", required=True, help="coordinator address HOST:PORT")
    parser.add_argument("--data", required=True, type=Path,
                        help="LLaVA pretraining JSON, or a folder holding chat.json and images/")
    parser.add_argument("--image-folder", type=Path, help="where the JSON's image paths resolve (default: images/ "
                                                          "beside the JSON)")
    parser.add_argument("--client-id", help="stable name of this client (default: the data folder's name)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vision-model", help="local path or hub id standing in for the recipe's vision tower")
    parser.add_argument("--llm", help="local path or hub id standing in for the recipe's LLM")
    parser.add_argument("--batch-size", type=int, help="override the recipe's batch size on this client")
    parser.add_argument("--cache-dir", type=Path, help="model zoo and feature cache (default $FEDCMP_CACHE or "
                                                       "~/.cache/fedcmp)")
    parser.add_argument("--tls-ca", type=Path, help="CA that signed the coordinator's certificate (enables TLS)")
    parser.add_argument("--tls-cert", type=Path, help="this client's certificate, for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    parser.add_argument("--token-file", type=Path, help="file holding this client's bearer token")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for torch")
    parser.add_argument("--reconnect-budget", type=float, default=RECONNECT_BUDGET_S,
                        help="seconds to keep retrying an unreachable coordinator before giving up")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--progress-interval", type=float, default=30.0,
                        help="log step, loss and ETA of a local round every this many seconds")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (/metrics)")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="interface of --metrics-port; 0.0.0.0 for all (e.g. scraped in a pod)")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_common_flags(parser)
    return parser.parse_args(argv)


def default_client_id(data: Path) -> str:
    folder = data if data.is_dir() else data.parent
    return folder.resolve().name or "client"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fedcmp.client.data import DataError
    from fedcmp.client.trainer import LocalSession  # imports transformers, whose logging setup_logging adopts

    setup_logging(args.verbose, args.log_format)
    torch.set_num_threads(max(1, args.threads))
    signal.signal(signal.SIGTERM, _interrupt)  # as PID 1 in a container, SIGTERM is ignored without a handler

    if not args.data.exists():
        print(f"fedcmp-client: --data {args.data} does not exist", file=sys.stderr)
        return EXIT_USAGE
    client_id = args.client_id or default_client_id(args.data)
    try:
        tls = args.tls_ca or args.tls_cert
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key) if tls else None
        metadata = bearer_metadata(args.token_file) if args.token_file else ()
    except SecurityConfigError as error:
        print(f"fedcmp-client: {error}", file=sys.stderr)
        return EXIT_USAGE
    link = CoordinatorLink(ConnectionSettings(args.server, credentials, metadata, args.reconnect_budget))
    metrics = None
    if args.metrics_port is not None:
        metrics = ClientMetrics()
        metrics.serve(args.metrics_port, args.metrics_host)
        log.info("Prometheus metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port)
    daemon = ClientDaemon(link, client_id, TrainingProgress(args.progress_interval, metrics))
    try:
        recipe = daemon.fetch_recipe()
        local = {"vision_model": args.vision_model, "llm": args.llm, "batch_size": args.batch_size}
        recipe = recipe.model_copy(update={key: value for key, value in local.items() if value is not None})
        session = LocalSession.open(args.data, recipe, client_id, device=args.device, cache_dir=args.cache_dir,
                                    image_folder=args.image_folder, show_progress=not args.no_progress)
        backbones = fingerprint_backbones(recipe.vision_model, recipe.llm, args.cache_dir)
        log.info("backbones: %s", backbones.describe())
        daemon.run(session, backbones)
    except DataError as error:
        print(f"fedcmp-client: bad data: {error}", file=sys.stderr)
        return EXIT_USAGE
    except FingerprintError as error:
        print(f"fedcmp-client: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RegistrationRefused as error:
        print(f"fedcmp-client: the coordinator refused {client_id}: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except CoordinatorUnreachable as error:
        print(f"fedcmp-client: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        log.warning("stopped by a signal before DONE; the coordinator goes on without this client until it returns")
        return EXIT_STOPPED
    finally:
        link.close()
    return EXIT_OK


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends the daemon the way Ctrl-C does: no traceback, a log line, exit code EXIT_STOPPED."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
