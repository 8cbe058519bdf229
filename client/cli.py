"""`fedcmp-client`: join a coordinator with a local LLaVA-format dataset and train until DONE.

Also `python -m fedcmp.client`, and under torchrun (`torchrun --nproc-per-node N -m fedcmp.client
...`) one client on N processes/GPUs (fedcmp.client.distributed): rank 0 talks to the coordinator.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from fedcmp.client.daemon import ClientDaemon, ConnectionSettings, CoordinatorLink, CoordinatorUnreachable, RegistrationRefused
from fedcmp.client.distributed import Ranks, follow, leading, process_group
from fedcmp.client.fingerprint import FingerprintError, fingerprint_backbones
from fedcmp.client.precision import PRECISIONS
from fedcmp.common.constants import EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE, RECONNECT_BUDGET_S
from fedcmp.common.logs import setup_logging
from fedcmp.common.recipe import Recipe, RecipeError
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
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def default_client_id(data: Path) -> str:
    folder = data if data.is_dir() else data.parent
    return folder.resolve().name or "client"


def local_recipe(args: argparse.Namespace, recipe: Recipe) -> Recipe:
    """The coordinator's recipe with this client's own overrides (backbone paths, batch, precision, memory)."""
    local = {"vision_model": args.vision_model, "llm": args.llm, "batch_size": args.batch_size,
             "micro_batch_size": args.micro_batch_size, "precision": args.precision,
             "gradient_checkpointing": args.gradient_checkpointing}
    return recipe.overridden(local, "the coordinator's recipe with this client's flags")


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
    setup_logging(args.verbose)
    torch.set_num_threads(max(1, args.threads))
    from fedcmp.client.data import DataError
    from fedcmp.client.trainer import LocalSession

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
    try:
        device = ranks.device(check_device(args.device))
    except ValueError as error:
        print(f"fedcmp-client: {error}", file=sys.stderr)
        return EXIT_USAGE

    def open_session(recipe: Recipe) -> LocalSession:
        return LocalSession.open(args.data, recipe, client_id, device=device, cache_dir=args.cache_dir,
                                 image_folder=args.image_folder, show_progress=not args.no_progress and ranks.is_main)

    link = CoordinatorLink(ConnectionSettings(args.server, credentials, metadata, args.reconnect_budget))
    daemon = ClientDaemon(link, client_id)
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
        return EXIT_USAGE
    finally:
        link.close()
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
