"""`make demo`: a whole federated projector pre-training run on loopback, on the embedded default.

Builds the micro zoo and a 4-client LLaVA-format federation if missing, starts one
`fedcmp-server` and N `fedcmp-client` processes on 127.0.0.1, follows the run with the status
RPC, prints the final status table, and leaves under --out: the final projector
(safetensors), the per-round metrics (JSON lines), a plot, and every process's log. Every
process it started is stopped on the way out, whatever happens.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def wait_for_port(port_file: Path, server: subprocess.Popen, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if server.poll() is not None:
            raise RuntimeError(f"fedcmp-server exited early with code {server.returncode}")
        time.sleep(0.1)
    raise TimeoutError("fedcmp-server did not start listening in time")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--samples-per-client", type=int, default=240)
    parser.add_argument("--scenario", default="concept")
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--local-steps", type=int, default=10, help="optimizer steps per client per round")
    parser.add_argument("--cache-dir", type=Path)
    args = parser.parse_args(argv)

    from fedcmp.common.datagen import generate_federation
    from fedcmp.common.zoo import ensure_micro_zoo

    started = time.monotonic()
    zoo = ensure_micro_zoo(args.cache_dir)
    print(f"[demo] micro zoo ready at {zoo.root} ({time.monotonic() - started:.0f}s)", flush=True)
    data = args.out / "data"
    if not (data / "manifest.json").exists():
        generate_federation(data, args.scenario, args.clients, args.samples_per_client, test_samples=200, seed=0)
    print(f"[demo] data: {data} ({args.scenario} skew, {args.clients} clients)", flush=True)

    state = args.out / "server"
    shutil.rmtree(state, ignore_errors=True)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port_file = args.out / "server.port"
    port_file.unlink(missing_ok=True)
    cache = ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    processes: list[subprocess.Popen] = []
    try:
        server = subprocess.Popen(
            [str(BIN / "fedcmp-server"), "--port", "0", "--port-file", str(port_file), "--state-dir", str(state),
             "--rounds", str(args.rounds), "--min-clients", str(args.clients), "--strategy", args.strategy,
             "--local-steps", str(args.local_steps), "--exit-when-done"],
            stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT)
        processes.append(server)
        address = f"127.0.0.1:{wait_for_port(port_file, server)}"
        print(f"[demo] coordinator on {address}; starting {args.clients} clients", flush=True)
        for index in range(args.clients):
            processes.append(subprocess.Popen(
                [str(BIN / "fedcmp-client"), "--server", address, "--data", str(data / f"client_{index}"),
                 "--threads", "1", "--no-progress", *cache],
                stdout=open(logs / f"client_{index}.log", "w"), stderr=subprocess.STDOUT))
        watcher = subprocess.Popen([str(BIN / "fedcmp-status"), "--server", address, "--watch", "--json"],
                                   stdout=subprocess.PIPE, text=True)
        processes.append(watcher)
        print(render_status(follow(watcher)), flush=True)
        codes = [process.wait(timeout=120) for process in processes[:-1]]
        if any(codes):
            print(f"[demo] a process failed (exit codes {codes}); see {logs}", file=sys.stderr)
            return 1
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
    publish(state, args.out)
    print(f"[demo] finished in {time.monotonic() - started:.0f}s; outputs in {args.out}", flush=True)
    return 0


def follow(watcher: subprocess.Popen) -> dict:
    """Print a line whenever the phase or round changes, until the run is DONE; returns the last status."""
    last = None
    status: dict = {}
    for line in watcher.stdout:
        status = json.loads(line)
        now = (status["phase"], status["round"], len(status.get("reported", [])))
        if now != last:
            history = status.get("history") or []
            loss = history[-1]["metrics"].get("train_loss") if history else None
            extra = f"   last round train_loss {loss:.4f}" if loss is not None else ""
            print(f"[demo] {status['phase']:<11} round {status['round']}/{status['total_rounds']}  "
                  f"uploads {len(status.get('reported', []))}/{len(status.get('selected', []))}{extra}", flush=True)
            last = now
        if status["phase"] == "DONE":
            break
    return status


def render_status(status: dict) -> str:
    """The `fedcmp-status` table of a status the watcher printed as JSON."""
    from google.protobuf.json_format import ParseDict

    from fedcmp.common.wire import coordinator_pb2 as pb
    from fedcmp.server.status_cli import render

    return render(ParseDict(status, pb.Status()))


def publish(state: Path, out: Path) -> None:
    """Copy the final projector and metrics next to the logs, and draw the loss curve."""
    from fedcmp.common.plots import plot_run

    record = json.loads((state / "run.json").read_text())
    final = state / "global" / f"v{record['global_version']}.safetensors"
    shutil.copyfile(final, out / "projector.safetensors")
    shutil.copyfile(state / "metrics.jsonl", out / "metrics.jsonl")
    plot_run(out / "metrics.jsonl", out / "loss.png")
    before = record["history"][0]["metrics"].get("val_loss") if record["history"] else None
    after = record["final_metrics"].get("val_loss")
    if before is not None and after is not None:
        print(f"[demo] held-out caption loss: {before:.4f} before training -> {after:.4f} after", flush=True)
    print(f"[demo] final projector: {out / 'projector.safetensors'}; metrics: {out / 'metrics.jsonl'}; "
          f"plot: {out / 'loss.png'}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
