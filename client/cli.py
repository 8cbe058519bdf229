"""`fedcmp-client`: join a coordinator with a local dataset and train until DONE (or `--check` it alone).

The data is scanned and validated before the coordinator is first contacted, so bad data ends
the client at once with exit 2. Also `python -m fedcmp.client`, and under torchrun
(`torchrun --nproc-per-node N -m fedcmp.client ...`) one client on N processes/GPUs
(fedcmp.client.distributed): rank 0 talks to the coordinator.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from fedcmp.client.data import DataError, DataOptions, ScannedData, scan_data
from fedcmp.client.sources import FORMATS, Columns
from fedcmp.client.daemon import ClientDaemon, ConnectionSettings, CoordinatorLink, CoordinatorUnreachable, RegistrationRefused
from fedcmp.client.distributed import Ranks, follow, leading, process_group
from fedcmp.client.fingerprint import FingerprintError, fingerprint_backbones
from fedcmp.client.metrics import ClientMetrics
from fedcmp.client.precision import PRECISIONS
from fedcmp.client.progress import TrainingProgress
from fedcmp.common.cliflags import add_common_flags
from fedcmp.common.constants import (EXIT_OK, EXIT_REFUSED, EXIT_STOPPED, EXIT_UNAVAILABLE, EXIT_USAGE,
                                     RECONNECT_BUDGET_S)
from fedcmp.common.logs import setup_logging
from fedcmp.common.recipe import Recipe, RecipeError, load_recipe
from fedcmp.common.security import SecurityConfigError, bearer_metadata, channel_credentials

log = logging.getLogger("fedcmp.client")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedcmp-client", description=__doc__)
    parser.add_argument("--server", help="coordinator address HOST:PORT (required unless --check)")
    parser.add_argument("--data", required=True, type=Path,
                        help="LLaVA JSON (or a folder with chat.json + images/), JSON Lines, Parquet file(s), "
                             "WebDataset .tar shard(s), or a `datasets` save_to_disk folder")
    parser.add_argument("--check", action="store_true",
                        help="validate the data and backbones without any coordinator, print a report, exit 0 or 2")
    parser.add_argument("--recipe", type=Path, help="with --check: the federation's recipe file (default: defaults)")
    data = parser.add_argument_group("data")
    data.add_argument("--data-format", default="auto", choices=("auto", *FORMATS), help="default: detected")
    data.add_argument("--image-folder", type=Path, help="where relative image paths resolve (default: images/ beside "
                                                        "a LLaVA JSON, else the data's folder)")
    data.add_argument("--id-column", default=Columns.id, help="record field holding the example id (default: %(default)s; "
                                                              "absent: the row number)")
    data.add_argument("--image-column", default=Columns.image, help="record field holding the image path or bytes "
                                                                    "(default: %(default)s)")
    data.add_argument("--caption-column", default=Columns.caption,
                      help="record field holding the caption (default: %(default)s; LLaVA conversations also work)")
    data.add_argument("--on-bad-sample", choices=("skip", "fail"), default="skip",
                      help="skip (and count) unusable samples, or stop at the first (default: %(default)s)")
    data.add_argument("--max-bad-fraction", type=float, default=0.01,
                      help="stop when more than this fraction of samples is bad (default: %(default)s)")
    data.add_argument("--feature-cache", choices=("disk", "off"),
                      help="frozen features cached on disk, or the tower on every batch (default: the recipe's)")
    data.add_argument("--feature-cache-dir", type=Path, help="where the feature cache lives (default: "
                                                             "<cache dir>/features)")
    data.add_argument("--workers", type=int, default=2, help="processes decoding images (default: %(default)s)")
    parser.add_argument("--client-id", help="stable name of this client (default: the data folder's name)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (under torchrun, cuda means cuda:LOCAL_RANK)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="override the recipe's precision on this client (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--vision-model", help="local path or hub id standing in for the recipe's vision tower")
    parser.add_argument("--llm", help="local path or hub id standing in for the recipe's LLM")
    parser.add_argument("--batch-size", type=int, help="override the recipe's batch size on this client")
    parser.add_argument("--micro-batch-size", type=int,
                        help="examples per forward pass on this client, per rank under torchrun (gradients "
                             "accumulate up to the recipe's batch size; the update does not change, only the "
                             "memory it takes)")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None,
                        help="recompute the frozen LM's activations in the backward (less memory, ~1/3 more "
                             "compute; the update does not change)")
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


def data_options(args: argparse.Namespace) -> DataOptions:
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        raise DataError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    if args.workers < 0:
        raise DataError(f"--workers must be at least 0, got {args.workers}")
    return DataOptions(format=args.data_format, image_folder=args.image_folder,
                       columns=Columns(id=args.id_column, image=args.image_column, caption=args.caption_column),
                       on_bad_sample=args.on_bad_sample, max_bad_fraction=args.max_bad_fraction,
                       feature_cache_dir=args.feature_cache_dir, workers=args.workers)


def local_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Recipe fields this client sets for itself (backbone paths, batch, precision, memory, feature cache)."""
    local = {"vision_model": args.vision_model, "llm": args.llm, "batch_size": args.batch_size,
             "micro_batch_size": args.micro_batch_size, "precision": args.precision,
             "gradient_checkpointing": args.gradient_checkpointing, "feature_cache": args.feature_cache}
    return {key: value for key, value in local.items() if value is not None}


def run_check(args: argparse.Namespace, scanned: ScannedData, options: DataOptions) -> int:
    """--check: the report of `fedcmp.client.check`, exit 0; bad data or backbones exit 2."""
    from fedcmp.client.check import check_site
    from fedcmp.client.model import ProjectorMLLM

    try:
        recipe = load_recipe(args.recipe, local_overrides(args))
    except RecipeError as error:
        print(f"fedcmp-client: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        model = ProjectorMLLM.from_pretrained(recipe.vision_model, recipe.llm, recipe, args.device, args.cache_dir)
    except (OSError, ValueError) as error:
        print(f"fedcmp-client: cannot load the backbones ({recipe.vision_model}, {recipe.llm}): {error}",
              file=sys.stderr)
        return EXIT_USAGE
    report = check_site(model, recipe, scanned, options)
    print("\n".join(report.lines()))
    print("check passed")
    return EXIT_OK


def default_client_id(data: Path) -> str:
    folder = data if data.is_dir() else data.parent
    return folder.resolve().name or "client"


def local_recipe(args: argparse.Namespace, recipe: Recipe) -> Recipe:
    """The coordinator's recipe with this client's own overrides (backbone paths, batch, precision, memory)."""
    return recipe.overridden(local_overrides(args), "the coordinator's recipe with this client's flags")


def check_device(device: str) -> str:
    """`device` if this machine has it (cpu, cuda, cuda:N); a ValueError saying why not otherwise."""
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device}: not a device ({error})") from error
    if torch_device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: this machine has no CUDA device (or this PyTorch has no CUDA)")
        if torch_device.index is not None and torch_device.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif torch_device.type != "cpu":
        raise ValueError(f"--device {device}: fedcmp-client runs on cpu or cuda[:N]")
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ranks = Ranks.from_env()
    setup_logging(args.verbose, args.log_format)
    from fedcmp.client.trainer import LocalSession  # imports transformers, whose logging setup_logging adopted
    torch.set_num_threads(max(1, args.threads))
    signal.signal(signal.SIGTERM, _interrupt)  # as PID 1 in a container, SIGTERM is ignored without a handler

    if args.server is None and not args.check:
        print("fedcmp-client: --server is required (or --check to validate the data alone)", file=sys.stderr)
        return EXIT_USAGE
    try:  # before any coordinator is contacted: bad data is exit 2 at once
        options = data_options(args)
        scanned = scan_data(args.data, options)
        if args.check:
            return run_check(args, scanned, options)
    except DataError as error:
        print(f"fedcmp-client: bad data: {error}", file=sys.stderr)
        return EXIT_USAGE
    client_id = args.client_id or default_client_id(args.data)
    try:
        tls = args.tls_ca or args.tls_cert
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key) if tls else None
        metadata = bearer_metadata(args.token_file) if args.token_file else ()
    except SecurityConfigError as error:
        print(f"fedcmp-client: {error}", file=sys.stderr)
        return EXIT_USAGE
    if metadata and credentials is None:
        log.warning("!!! sending the bearer token over PLAINTEXT: anyone on the network path can read it and act "
                    "as this client; use TLS (--tls-ca) !!!")
    try:
        device = ranks.device(check_device(args.device))
    except ValueError as error:
        print(f"fedcmp-client: {error}", file=sys.stderr)
        return EXIT_USAGE

    def open_session(recipe: Recipe) -> LocalSession:
        return LocalSession.open(scanned, recipe, client_id, device=device, cache_dir=args.cache_dir,
                                 options=options, show_progress=not args.no_progress and ranks.is_main)

    link = CoordinatorLink(ConnectionSettings(args.server, credentials, metadata, args.reconnect_budget))
    metrics = None
    if args.metrics_port is not None and ranks.is_main:  # one exporter per client, on the rank that reports
        metrics = ClientMetrics()
        metrics.serve(args.metrics_port, args.metrics_host)
        log.info("Prometheus metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port)
    daemon = ClientDaemon(link, client_id, TrainingProgress(args.progress_interval, metrics))
    try:
        with process_group(ranks, device) as group:
            if group is not None and not ranks.is_main:  # the coordinator only ever hears from rank 0
                follow(group, open_session)
                return EXIT_OK
            with leading(group) as leader:
                session = leader.open(local_recipe(args, daemon.fetch_recipe()), open_session)
                backbones = fingerprint_backbones(session.recipe.vision_model, session.recipe.llm, args.cache_dir)
                log.info("backbones: %s", backbones.describe())
                daemon.run(session, backbones)
    except DataError as error:
        print(f"fedcmp-client: bad data: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (FingerprintError, RecipeError) as error:
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
