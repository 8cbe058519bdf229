"""`fedcmp-server`: start (or resume) a coordinator on a port, run the recipe to DONE, keep serving status."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from pathlib import Path

# Before torch loads libgomp: its threads then sleep as soon as a parallel region ends instead of
# spinning, waiting for the next. Between network waits the coordinator runs many short tensor
# ops; spinning after each was 40% of its CPU (docs/decisions.md). An operator's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import grpc  # noqa: E402 (after the environment above)
import torch  # noqa: E402
from grpc_health.v1 import health, health_pb2

from fedcmp.common.allocator import limit_arenas
from fedcmp.common.cliflags import add_common_flags
from fedcmp.common.constants import DEFAULT_PORT, EXIT_OK, EXIT_USAGE
from fedcmp.common.logs import setup_logging
from fedcmp.common.recipe import OPERATIONAL_FIELDS, Recipe, RecipeError, load_recipe, resumed_recipe
from fedcmp.common.recipe_flags import add_recipe_flags, recipe_overrides
from fedcmp.common.security import SecurityConfigError
from fedcmp.server.metrics import CoordinatorMetrics
from fedcmp.server.rounds import Coordinator
from fedcmp.server.security import load_tokens, server_credentials
from fedcmp.server.service import SERVICE_NAME, STREAM_WINDOW_BYTES, build_server, status_message
from fedcmp.server.status_endpoint import REFRESH_S, StatusEndpoint, publish_status
from fedcmp.server.store import RunRecord, RunStore, StateError
from fedcmp.server.strategies import Strategy, build_strategy

log = logging.getLogger("fedcmp.server")

# malloc arenas for all of the server's threads. glibc's default (8 per core, one per new thread)
# let 16 concurrent 84 MB uploads leave the server 6.5 projectors of anonymous memory above its
# start, against 5.2 with 2 arenas, at the same CPU (docs/decisions.md).
SERVER_ARENAS = 2


def stream_window_mib(text: str) -> float:
    """--stream-window-mib: MiB from 1/16 (64 KiB, HTTP/2's default window) to 1024."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB") from None
    if not 1 / 16 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"{text} MiB is outside 0.0625-1024")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedcmp-server", description=__doc__)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (printed at start)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 for all")
    parser.add_argument("--config", type=Path, help="recipe file (YAML or JSON); flags override its fields")
    parser.add_argument("--state-dir", type=Path, default=Path("runs/server"))
    parser.add_argument("--resume", action="store_true",
                        help="continue the run held in --state-dir; only operational recipe fields may change "
                             f"({', '.join(sorted(OPERATIONAL_FIELDS))})")
    parser.add_argument("--start-or-resume", action="store_true",
                        help="resume the run in --state-dir if it holds one, else start it (for restarted containers)")
    parser.add_argument("--exit-when-done", action="store_true",
                        help="exit once the run is DONE and every client has been told (default: keep serving status "
                             "until SIGTERM/SIGINT)")
    parser.add_argument("--linger", type=float, default=30.0,
                        help="with --exit-when-done: wait at most this many seconds for every client to be told")
    parser.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="private key of --tls-cert (PEM)")
    parser.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)")
    parser.add_argument("--auth-tokens", type=Path,
                        help="file of 'CLIENT_ID TOKEN' and 'operator:NAME TOKEN' lines; every call but health then "
                             "needs a bearer token (status an operator's)")
    parser.add_argument("--public-status", action="store_true",
                        help="with --auth-tokens: GetStatus/WatchStatus/reflection need no token")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (/metrics)")
    parser.add_argument("--stream-window-mib", type=stream_window_mib, default=STREAM_WINDOW_BYTES / 2**20,
                        help="HTTP/2 receive window of each transfer in MiB (0.0625-1024): bounds the memory an "
                             "upload parks in the server and one transfer's speed at window / round-trip time")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving (for scripts)")
    parser.add_argument("--status-port", type=int,
                        help="also answer GetStatus and WatchStatus on this port (0: any free one), from a thread "
                             "of its own, so that status calls never wait behind the round's transfers")
    parser.add_argument("--status-port-file", type=Path, help="write the bound status port here once serving")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_common_flags(parser)
    add_recipe_flags(parser)
    return parser.parse_args(argv)


def resolve_recipe(args: argparse.Namespace, store: RunStore) -> Recipe:
    """The run's recipe: --config and the recipe flags, or on --resume the stored one with operational changes."""
    overrides = recipe_overrides(args)
    if not args.resume:
        return load_recipe(args.config, overrides)
    stored = Recipe.from_json(store.load_recipe_json())
    recipe = resumed_recipe(stored, args.config, overrides)
    if recipe != stored:
        changes = {name: getattr(recipe, name) for name in sorted(OPERATIONAL_FIELDS)
                   if getattr(recipe, name) != getattr(stored, name)}
        log.info("resuming with %s", ", ".join(f"{name}={value!r}" for name, value in changes.items()))
        store.save_recipe_json(recipe.to_json())  # a later --resume continues with these values
    return recipe


def restore_strategy(strategy: Strategy, store: RunStore, record: RunRecord) -> None:
    """Give `strategy` the state of the run's last commit (a run with no commit yet starts fresh)."""
    if record.committed_round > 0:
        strategy.load_state_dict(store.load_strategy_state(record.committed_round))


def open_run(args: argparse.Namespace) -> Coordinator:
    store = RunStore(args.state_dir)
    args.resume = args.resume or (args.start_or_resume and store.has_run())
    if args.resume and not store.has_run():
        raise StateError(f"--resume given but {args.state_dir} holds no run")
    recipe = resolve_recipe(args, store)
    strategy = build_strategy(recipe.strategy, recipe.strategy_params)  # a bad name or knob: refused before any write
    if args.resume:
        record = store.load()
        log.info("resuming %s at round %d of %d", args.state_dir, record.committed_round + 1, recipe.rounds)
    else:
        record = store.create(recipe.to_json(), recipe.strategy)
    restore_strategy(strategy, store, record)
    metrics = None
    if args.metrics_port is not None:
        metrics = CoordinatorMetrics()
        metrics.serve(args.metrics_port, args.host)
        log.info("Prometheus metrics on http://%s:%d/metrics", args.host, args.metrics_port)
    coordinator = Coordinator(recipe, store, strategy, record, metrics)
    if metrics is not None:
        metrics.track_clients(coordinator)
    return coordinator


def security(args: argparse.Namespace) -> tuple[grpc.ServerCredentials | None, dict[str, str] | None]:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SecurityConfigError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    return credentials, load_tokens(args.auth_tokens) if args.auth_tokens else None


async def serve(args: argparse.Namespace, coordinator: Coordinator, credentials: grpc.ServerCredentials | None,
                tokens: dict[str, str] | None) -> int:
    server, port = build_server(coordinator, f"{args.host}:{args.port}", credentials, tokens, args.public_status,
                                round(args.stream_window_mib * 2**20))
    await server.start()
    if tokens and credentials is None:
        log.warning("!!! bearer tokens over PLAINTEXT: anyone on the network path can read them and act as your "
                    "clients; serve TLS (--tls-cert/--tls-key) !!!")
    log.info("coordinator listening on %s:%d (%s%s; strategy %s, %d rounds, state %s)", args.host, port,
             "mutual TLS" if args.tls_client_ca else "TLS" if credentials else "plaintext",
             ", bearer tokens" if tokens else "", coordinator.strategy.name, coordinator.recipe.rounds, args.state_dir)
    if args.port_file:
        args.port_file.write_text(str(port))
    endpoint, publisher = None, None
    if args.status_port is not None:
        endpoint = StatusEndpoint(f"{args.host}:{args.status_port}", credentials, tokens, args.public_status)
        try:
            status_port = endpoint.start()
        except ValueError as error:
            log.error("%s", error)
            endpoint.stop()
            await server.stop(grace=None)
            return EXIT_USAGE
        publisher = asyncio.create_task(publish_status(endpoint, lambda: status_message(coordinator)))
        log.info("status also on %s:%d (GetStatus, WatchStatus; its own thread; snapshots every %.1fs)", args.host,
                 status_port, REFRESH_S)
        if args.status_port_file:
            args.status_port_file.write_text(str(status_port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    health = asyncio.create_task(mirror_health(coordinator, server.health_servicer))
    run = asyncio.create_task(coordinator.run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({run, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        run.result()  # surface a crash of the round loop
        log.info("run DONE; final metrics: %s", coordinator.record.final_metrics)
        if args.exit_when_done:
            deadline = time.monotonic() + args.linger
            while (time.monotonic() < deadline and not stop.is_set()
                   and not set(coordinator.clients) <= coordinator.told_done):
                await asyncio.sleep(0.2)
        else:
            log.info("serving status until stopped (SIGTERM or SIGINT)")
            await stopper
        log.info("stopping")
    else:
        log.info("stopping on signal; state is committed up to round %d", coordinator.record.committed_round)
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
    health.cancel()
    stopper.cancel()
    if endpoint is not None:
        publisher.cancel()
        endpoint.stop()
    await server.health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2.0)
    return EXIT_OK


async def mirror_health(coordinator: Coordinator, health_servicer: health.aio.HealthServicer) -> None:
    """SERVING while the coordinator can commit, NOT_SERVING while its disk writes fail."""
    async for _ in coordinator.watch():
        status = health_pb2.HealthCheckResponse.SERVING if coordinator.healthy else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, status)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose, args.log_format)
    limit_arenas(SERVER_ARENAS)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        credentials, tokens = security(args)
        coordinator = open_run(args)
    except (RecipeError, StateError, ValueError) as error:
        print(f"fedcmp-server: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # the state dir cannot be created, read or written
        print(f"fedcmp-server: --state-dir {args.state_dir} is not usable: {error.strerror or error} "
              f"({error.filename or args.state_dir})", file=sys.stderr)
        return EXIT_USAGE
    gc.freeze()  # the modules and run state loaded so far: out of every later garbage collection
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop is not available on Windows
        runner = asyncio.run
    return runner(serve(args, coordinator, credentials, tokens))


if __name__ == "__main__":
    raise SystemExit(main())
