"""One Flower federation for the system benchmark, run as Flower's deployment guide runs one.

`flower-superlink --insecure`, K `flower-supernode --insecure --superlink ...` processes, and
`flwr run bench/flower_app <connection> --stream` with the connection written to a private
Flower configuration ($FLWR_HOME/config.toml). The App (bench/flower_app) runs Flower's own
FedAvg strategy over the same no-op workload as fedcmp's clients and writes each round's start
and end; the server's CPU and memory are those of the SuperLink's process tree (SuperLink,
SuperExec and the ServerApp process it starts). Flower lives in its own virtual environment
(`--flower-venv`): it pins protobuf < 7, fedcmp needs protobuf >= 7.35.1.
Runtime installation of App dependencies is switched off: they are installed with the venv.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from proc_sampler import TreeSampler
from system_fedcmp import Workload
from system_run import Launcher, Round, RunResult, free_port, measured, port_open, wait_until

FLOWER_APP = Path(__file__).resolve().with_name("flower_app")
CONNECTION = "bench"


def flower_config(superlink_port: int) -> str:
    """A Flower configuration whose `bench` connection is the local SuperLink, without TLS."""
    return (f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{superlink_port}"\ninsecure = true\n')


def run_flower(workload: Workload, workdir: Path, venv: Path, timeout_s: float = 900) -> RunResult:
    bin_dir = venv.resolve() / "bin"  # the commands run from the run's work directory
    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    superlink_port = free_port()
    (home / "config.toml").write_text(flower_config(superlink_port))
    timing_file = workdir / "rounds.jsonl"
    # The SuperLink and SuperNodes start Flower's other executables from PATH.
    launcher = Launcher(workdir / "logs", env={"FLWR_HOME": str(home),
                                               "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    try:
        superlink = launcher.start("superlink", [
            str(bin_dir / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
            "--port", str(superlink_port)])
        wait_until(lambda: port_open(superlink_port) or superlink.poll() is not None, 120,
                   "flower-superlink did not start")
        if superlink.poll() is not None:
            raise RuntimeError(f"flower-superlink exited: {launcher.log_tail('superlink')}")
        with TreeSampler({"server": superlink.pid, "run": os.getpid()}) as sampler:
            for node in range(workload.clients):
                launcher.start(f"supernode-{node}", [
                    str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{superlink_port}",
                    "--port", str(free_port())])
            run_config = (f"nodes={workload.clients} rounds={workload.rounds} "
                          f"vision-hidden={workload.vision_hidden} text-hidden={workload.text_hidden} "
                          f"timing-file='{timing_file}'")
            run = launcher.start("flwr-run", [str(bin_dir / "flwr"), "run", str(FLOWER_APP), CONNECTION,
                                              "--run-config", run_config, "--stream"], cwd=workdir)
            wait_until(lambda: len(_rounds(timing_file)) >= workload.rounds or run.poll() is not None, timeout_s,
                       f"Flower with {workload.clients} supernodes did not finish {workload.rounds} rounds", 0.2)
        rounds = _rounds(timing_file)
        if len(rounds) < workload.rounds:
            raise RuntimeError(f"flwr run ended after {len(rounds)} rounds: {launcher.log_tail('flwr-run')}")
        return measured("flower", workload.clients, rounds, sampler)
    finally:
        launcher.stop_all()


def _rounds(timing_file: Path) -> list[Round]:
    if not timing_file.exists():
        return []
    complete = timing_file.read_text().rpartition("\n")[0]  # a line still being written is left for later
    rows = [json.loads(line) for line in complete.splitlines() if line.strip()]
    return [Round(row["round"], row["start"], row["end"]) for row in rows]
