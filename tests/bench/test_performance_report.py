"""docs/PERFORMANCE.md's verdicts: each issue-12 target met or missed from the run's figures."""
from __future__ import annotations

from bench_aggregation import Timings
from performance_report import Report, SystemPair, projector_bytes
from system_run import Round, RunResult

PROJECTOR = {"vision_hidden": 1024, "text_hidden": 4096}
SIZE = projector_bytes(**PROJECTOR)


def run(system: str, clients: int, round_s: float, cpu_s: float, peak: float, baseline: float = 0.0,
        **notes: float) -> RunResult:
    return RunResult(system, clients, [Round(1, 0.0, round_s)], server_cpu_s=[cpu_s], server_system_s=[cpu_s / 2],
                     run_cpu_s=[3 * cpu_s], machine_busy_s=[4 * cpu_s], peak_rss_bytes=int(peak),
                     peak_anon_bytes=int(peak / 2), baseline_rss_bytes=int(baseline),
                     baseline_anon_bytes=int(baseline / 2), notes=dict(notes))


def report(speedup: float, cpu_per_client: float, rss_share: float, projectors_at_64: float, p99_s: float,
           aggregation_ratio: float) -> Report:
    ours = run("fedcmp", 16, 1.0, 16 * cpu_per_client, 1e9)
    theirs = run("flower", 16, speedup, 1.0, 1e9 / rss_share)
    result = Report({"cpus": "2", "python": "3", "torch": "2", "flower": "1", "commit": "x", "date": "d"},
                    quick=False, load_before=(1.0, 1.0, 1.0), load_after=(1.0, 1.0, 1.0), wall_s=60.0)
    result.pairs = [SystemPair(1024, 4096, ours, theirs)]
    result.rss_run = run("fedcmp", 64, 9.0, 9.0, 3e8 + projectors_at_64 * SIZE, baseline=3e8)
    result.swarm_run = run("fedcmp", 256, 5.0, 5.0, 4e8, status_p99_s=p99_s, status_calls=100.0, health_p99_s=0.002, health_p50_s=0.001,
                           status_p50_s=0.01, status_max_s=p99_s)
    result.aggregation = [(16, False, Timings([1.0, 1.1], [aggregation_ratio, 9.0], [2.5, 2.6]))]
    result.bf16_run = run("fedcmp", 16, 0.5, 8 * cpu_per_client, 1e9)
    return result


def test_every_target_met() -> None:
    verdicts = report(7.0, 0.1, 0.25, 3.5, 0.03, 3.0).verdicts(PROJECTOR)
    assert len(verdicts) == 6 and all(v.met for v in verdicts)


def test_every_target_missed_with_its_margin() -> None:
    verdicts = report(3.0, 0.4, 0.5, 6.0, 0.1, 6.0).verdicts(PROJECTOR)
    assert not any(v.met for v in verdicts)
    assert [v.margin for v in verdicts] == ["short by 2.00x", "over by 2.00x", "over by 1.50x", "over by 1.50x",
                                            "over by 2.00x", "over by 1.50x"]


def test_markdown_has_every_table() -> None:
    text = report(7.0, 0.1, 0.25, 3.5, 0.03, 3.0).markdown(PROJECTOR)
    for heading in ("## Targets", "## Reading the figures", "## One round", "## Aggregation", "## Server memory with 64",
                    "## 256 clients"):
        assert heading in text


def test_aggregation_table_shows_the_products_floor_beside_each_ratio() -> None:
    text = report(7.0, 0.1, 0.25, 3.5, 0.03, 3.0).markdown(PROJECTOR)
    assert "| 16 | in memory | 2 | 1.000 s | 3.000 s | 3.00x | 2.500 s | 2.50x |" in text


def test_the_machine_counts_as_shared_by_the_load_before_and_the_other_work_not_the_load_after() -> None:
    quiet = report(7.0, 0.1, 0.25, 3.5, 0.03, 3.0)  # load 1.0 before on 2 cores
    for run in (quiet.pairs[0].fedcmp, quiet.pairs[0].flower):
        run.machine_busy_s = list(run.run_cpu_s)  # no CPU but the benchmark's in the timed rounds
    quiet.load_after = (30.0, 10.0, 5.0)  # the benchmark's own 256 clients
    assert "shared with other work" not in quiet.markdown(PROJECTOR)
    busy = report(7.0, 0.1, 0.25, 3.5, 0.03, 3.0)
    busy.pairs[0].fedcmp.machine_busy_s = [busy.pairs[0].fedcmp.run_cpu_s[0] + 3.0]  # others: 4 of 16 core-seconds
    assert "shared with other work" in busy.markdown(PROJECTOR)


def test_memory_table_sets_the_64_client_round_against_the_smallest_k() -> None:
    text = report(7.0, 0.1, 0.25, 3.5, 0.03, 3.0).markdown(PROJECTOR)
    memory = text.split("## Server memory with 64 clients")[1].split("\n## ")[0]
    rows = [line for line in memory.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 16", "| 64"]
    assert "| 3.5 |" in rows[1]  # peak above the start, in projectors


def test_bfloat16_run_is_set_beside_the_float32_round_of_the_same_k() -> None:
    text = report(7.0, 0.1, 0.25, 3.5, 0.03, 3.0).markdown(PROJECTOR)
    assert "| 16 | float32 | 1.00 s | 7.00 s | 7.00x |" in text
    assert "| 16 | bfloat16 | 0.50 s | 7.00 s | 14.00x |" in text


def test_cpu_table_splits_each_round_between_server_clients_and_the_rest_of_the_machine() -> None:
    text = report(7.0, 0.1, 0.25, 3.5, 0.03, 3.0).markdown(PROJECTOR)
    # fedcmp at K = 16: server 1.6 s (0.8 s kernel), run 4.8 s, machine 6.4 s, over 2 cores x 1 s
    assert "| 83.9 MB | 16 | fedcmp | 1.00 s | 1.60 s | 0.80 s | 3.20 s | 1.60 s | 3.20 |" in text
    assert "| 83.9 MB | 16 | fedcmp (bf16 wire) | 0.50 s |" in text


def test_status_verdict_sets_the_health_check_beside_get_status() -> None:
    verdict = report(7.0, 0.1, 0.25, 3.5, 0.03, 3.0).verdicts(PROJECTOR)[4]
    assert verdict.measured == "round done; p99 30 ms on the main port (health check p99 2.0 ms)" and verdict.met


def test_status_verdict_is_the_status_ports_with_the_main_port_beside_it() -> None:
    result = report(7.0, 0.1, 0.25, 3.5, 0.3, 3.0)  # the main port's p99: 300 ms
    result.swarm_run.notes |= {"status_port_p99_s": 0.012, "status_port_p50_s": 0.001, "status_port_calls": 90.0,
                               "status_port_max_s": 0.02}
    verdict = result.verdicts(PROJECTOR)[4]
    assert verdict.measured == ("round done; p99 12 ms on the status port, p99 300 ms on the main port "
                                "(health check p99 2.0 ms)") and verdict.met
    result.swarm_run.notes["status_port_p99_s"] = 0.07
    assert not result.verdicts(PROJECTOR)[4].met
    assert "| GetStatus, status port | 90 | 1.0 ms | 70.0 ms | 20.0 ms |" in result.markdown(PROJECTOR)


def test_reading_section_splits_the_round_and_memory_from_the_tables() -> None:
    text = report(7.0, 0.1, 0.25, 3.5, 0.03, 3.0).markdown(PROJECTOR)
    reading = text.split("## Reading the figures")[1].split("\n## ")[0]
    assert "busy 3.2 s of fedcmp's 1.0 s round" in reading  # 6.4 busy CPU seconds on 2 cores
    assert "fedcmp's server used 1.6 s of CPU, its clients (and the harness) 3.2 s, other work 1.6 s" in reading
    assert "50% of fedcmp's server CPU" in reading
    assert "health check on the same loop" in reading


def test_status_reading_quotes_both_calls_and_does_not_guess_whose_tail_it_is() -> None:
    result = report(7.0, 0.1, 0.25, 3.5, 0.03, 3.0)
    result.swarm_run.notes |= {"status_p50_s": 0.010, "health_p50_s": 0.004, "status_p99_s": 0.2, "health_p99_s": 0.4}
    reading = result.markdown(PROJECTOR).replace("\n", " ")
    assert "GetStatus p50 10.0 ms, p99 200.0 ms; the health check on the same loop, which builds nothing, p50 4.0 ms, " \
           "p99 400.0 ms." in reading
    assert "this run does not split the tails" in reading


def test_status_verdict_and_reading_set_the_idle_reference_process_beside_the_status_port() -> None:
    result = report(7.0, 0.1, 0.25, 3.5, 0.3, 3.0)
    result.swarm_run.notes |= {"status_port_p99_s": 0.06, "status_port_p50_s": 0.002, "status_port_calls": 90.0,
                               "status_port_max_s": 0.08, "reference_p99_s": 0.055, "reference_p50_s": 0.001,
                               "reference_calls": 90.0, "reference_max_s": 0.07}
    verdict = result.verdicts(PROJECTOR)[4]
    assert verdict.measured.endswith("; an idle process answering a fixed status: p99 55.0 ms") and not verdict.met
    text = result.markdown(PROJECTOR)
    assert "| GetStatus, idle reference process | 90 | 1.0 ms | 55.0 ms | 70.0 ms |" in text
    reading = text.split("## Reading the figures")[1].split("\n## ")[0].replace("\n", " ")
    assert "The status port's p50 2.0 ms, p99 60.0 ms; an idle process" in reading
    assert "timed in the same loop: p50 1.0 ms, p99 55.0 ms." in reading


def test_server_cpu_is_shown_round_by_round_and_after_the_first_round() -> None:
    result = report(7.0, 0.1, 0.25, 3.5, 0.03, 3.0)
    ours = result.pairs[0].fedcmp  # K = 16
    ours.server_cpu_s, ours.server_system_s = [8.0, 2.4, 3.2], [4.0, 0.8, 1.6]
    verdict = result.verdicts(PROJECTOR)[1]
    assert verdict.measured == "0.28 s (worst K, 16); after the first round 0.17 s (worst K)" and not verdict.met
    reading = result.markdown(PROJECTOR).replace("\n", " ")
    assert "round by round (the kernel's part in brackets): K = 16: 0.500 s (0.250 s), 0.150 s (0.050 s), " \
           "0.200 s (0.100 s)." in reading
