"""Aggregation strategies: hand-computed baselines, the norm bound, Fed-CMP's properties and a
from-the-formulas reference of its step (docs/algorithm.md), overflow safety, durability through
safetensors, the registry and streaming over lazy update sequences."""
from __future__ import annotations

import dataclasses
import math
import statistics
import weakref
from collections.abc import Sequence

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcmp.server.strategies import ClientUpdate, Strategy, available_strategies, build_strategy, hyper_parameters
from fedcmp.server.rounds import update_norm
from fedcmp.server.strategies import base as strategies_base
from fedcmp.server.strategies.base import sum_of_squares
from fedcmp.server.strategies.fedcmp import (Rows, group_layers, overlap_fusion, reliability_weights, select_rank,
                                             significant_disagreement)

Params = dict[str, torch.Tensor]

MLP = {"linear_1.weight": (6, 5), "linear_1.bias": (6,), "linear_2.weight": (6, 6), "linear_2.bias": (6,)}
# m = 40 > 2 (r_max + oversample) = 12: Fed-CMP takes the randomized range-sketch path.
TALL = {"linear_1.weight": (40, 12), "linear_1.bias": (40,)}
SKETCH = {"r_max": 4, "oversample": 2}
FEDAVG_SETTING = {"alpha": 1.0, "tau": 1.0, "temperature": math.inf, "gamma": 0.0, "rho": math.inf, "beta": 0.0,
                  "eta_s": 1.0, "norm_bound": math.inf}
STEPS = 3  # the `steps` metric make_updates reports


def random_params(shapes: dict[str, tuple[int, ...]], gen: torch.Generator, scale: float = 1.0) -> Params:
    return {key: scale * torch.randn(shape, generator=gen) for key, shape in shapes.items()}


def low_rank(shape: tuple[int, ...], rank: int, gen: torch.Generator) -> torch.Tensor:
    if len(shape) < 2:
        return torch.randn(shape, generator=gen)
    return torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen) / rank**0.5


def random_deltas(shapes: dict[str, tuple[int, ...]], clients: int, gen: torch.Generator) -> list[Params]:
    """Client updates D_k: a shared rank-2 drift + a client-specific rank-1 part + noise."""
    shared = {key: 0.5 * low_rank(shape, 2, gen) for key, shape in shapes.items()}
    return [
        {
            key: shared[key] + 0.2 * low_rank(shape, 1, gen) + 0.05 * torch.randn(shape, generator=gen)
            for key, shape in shapes.items()
        }
        for _ in range(clients)
    ]


def make_updates(global_params: Params, deltas: Sequence[Params], samples: Sequence[int]) -> list[ClientUpdate]:
    return [
        ClientUpdate(f"client-{k}", n, {key: global_params[key] + d[key] for key in d}, {"loss": 1.0, "steps": STEPS})
        for k, (d, n) in enumerate(zip(deltas, samples))
    ]


def random_round(shapes: dict[str, tuple[int, ...]], clients: int, seed: int) -> tuple[Params, list[ClientUpdate]]:
    gen = torch.Generator().manual_seed(seed)
    global_params = random_params(shapes, gen)
    samples = torch.randint(1, 50, (clients,), generator=gen).tolist()
    return global_params, make_updates(global_params, random_deltas(shapes, clients, gen), samples)


def max_abs_diff(a: Params, b: Params) -> float:
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def flat(params: Params) -> torch.Tensor:
    return torch.cat([params[key].flatten() for key in sorted(params)])


# --- FedAvg / FedProx ----------------------------------------------------------------------


def test_fedavg_matches_hand_computation() -> None:
    def projector(weight: list[float], bias: float) -> Params:
        return {"linear_1.weight": torch.tensor([weight]), "linear_1.bias": torch.tensor([bias])}

    global_params = projector([0.0, 1.0], 2.0)
    updates = [
        ClientUpdate("a", 1, projector([1.0, 3.0], 2.0), {}),
        ClientUpdate("b", 3, projector([5.0, -1.0], 6.0), {}),
    ]
    # p = (1/4, 3/4): weight 0.25*[1, 3] + 0.75*[5, -1] = [4, 0]; bias 0.25*2 + 0.75*6 = 5
    result = build_strategy("fedavg").aggregate(global_params, updates)
    torch.testing.assert_close(result["linear_1.weight"], torch.tensor([[4.0, 0.0]]))
    torch.testing.assert_close(result["linear_1.bias"], torch.tensor([5.0]))


def test_fedprox_server_side_is_fedavg() -> None:
    global_params, updates = random_round(MLP, 4, seed=1)
    fedprox = build_strategy("fedprox")
    assert fedprox.name == "fedprox"
    result = fedprox.aggregate(global_params, updates)
    expected = build_strategy("fedavg").aggregate(global_params, updates)
    assert all(torch.equal(result[key], expected[key]) for key in expected)


def test_fedavg_equal_weighs_every_training_client_alike() -> None:
    global_params = {"linear_1.weight": torch.tensor([[0.0, 0.0]])}
    moves = {"a": (1, [1.0, 3.0]), "b": (3, [5.0, -1.0]), "idle": (0, [100.0, 100.0])}
    updates = [ClientUpdate(cid, n, {"linear_1.weight": torch.tensor([move])}, {}) for cid, (n, move) in moves.items()]
    result = build_strategy("fedavg-equal").aggregate(global_params, updates)
    torch.testing.assert_close(result["linear_1.weight"], torch.tensor([[3.0, 1.0]]))  # (a + b) / 2; idle weighs 0
    weighted = build_strategy("fedavg").aggregate(global_params, updates)
    torch.testing.assert_close(weighted["linear_1.weight"], torch.tensor([[4.0, 0.0]]))  # 0.25 a + 0.75 b


def nova_round(w: Params, steps: tuple[float, float] = (1.0, 3.0)) -> list[ClientUpdate]:
    # a: n = 2, tau = 1, D = [1, 0]; b: n = 6, tau = 3, D = [0, 3]
    return [ClientUpdate(cid, n, {"linear_1.weight": w["linear_1.weight"] + torch.tensor([move])}, {"steps": tau})
            for cid, n, tau, move in zip("ab", (2, 6), steps, ([1.0, 0.0], [0.0, 3.0]))]


def test_fednova_normalises_by_local_steps() -> None:
    # p = (1/4, 3/4): d = 1/4 [1, 0] / 1 + 3/4 [0, 3] / 3 = [0.25, 0.75]; tau_eff = 1/4 + 3/4 * 3 = 2.5
    step = torch.tensor([[0.625, 1.875]])  # tau_eff d
    w0 = {"linear_1.weight": torch.tensor([[1.0, -1.0]])}
    w1 = build_strategy("fednova").aggregate(w0, nova_round(w0))
    torch.testing.assert_close(w1["linear_1.weight"], w0["linear_1.weight"] + step)
    # with server momentum and step size (FedAvgM's rule): v1 = s, v2 = 0.5 s + s
    strategy = build_strategy("fednova", {"server_learning_rate": 0.5, "server_momentum": 0.5})
    w1 = strategy.aggregate(w0, nova_round(w0))
    w2 = strategy.aggregate(w1, nova_round(w1))
    torch.testing.assert_close(w1["linear_1.weight"], w0["linear_1.weight"] + 0.5 * step)
    torch.testing.assert_close(w2["linear_1.weight"], w1["linear_1.weight"] + 0.75 * step)


def test_fednova_needs_the_step_count() -> None:
    w0 = {"linear_1.weight": torch.zeros(1, 2)}
    for steps in ((1.0, 0.0), (1.0, math.nan)):
        with pytest.raises(ValueError, match="client 'b': fednova needs the number of local steps as metric 'steps'"):
            build_strategy("fednova").aggregate(w0, nova_round(w0, steps))
    missing = [dataclasses.replace(update, metrics={}) for update in nova_round(w0)]
    with pytest.raises(ValueError, match="client 'a'.*got None"):
        build_strategy("fednova").aggregate(w0, missing)


# --- the norm bound (every strategy) ----------------------------------------------------------


def test_norm_bound_clips_each_delta_to_a_multiple_of_the_median_norm() -> None:
    global_params = {"linear_1.weight": torch.tensor([[0.0, 0.0]])}
    # norms 1, 2, 10 (and an idle client, outside the median): median 2, bound 1.5 * 2 = 3
    moves = {"a": (1, [1.0, 0.0]), "b": (1, [0.0, 2.0]), "c": (1, [-10.0, 0.0]), "idle": (0, [0.0, 1e6])}
    updates = [ClientUpdate(cid, n, {"linear_1.weight": torch.tensor([move])}, {}) for cid, (n, move) in moves.items()]
    bounded = build_strategy("fedavg", {"norm_bound": 1.5}).aggregate(global_params, updates)
    torch.testing.assert_close(bounded["linear_1.weight"], torch.tensor([[(1.0 - 3.0) / 3, 2.0 / 3]]))  # c -> [-3, 0]
    plain = build_strategy("fedavg").aggregate(global_params, updates)
    torch.testing.assert_close(plain["linear_1.weight"], torch.tensor([[-3.0, 2.0 / 3]]))


def test_norm_bound_takes_its_median_over_the_clients_that_moved() -> None:
    # A client whose round was one step at a warm-up rate of 0 sends W^k = W. Counted, the three
    # still ones would pull the median of (0, 0, 0, 2, 4) to 0 and the bound would flatten every
    # move; over the movers (2, 4) the median is 3, the bound 1.5 * 3 = 4.5, and nothing is clipped.
    global_params = {"linear_1.weight": torch.tensor([[0.0, 0.0]])}
    moves = {"a": [2.0, 0.0], "b": [0.0, 4.0], "still-1": [0.0, 0.0], "still-2": [0.0, 0.0], "still-3": [0.0, 0.0]}
    updates = [ClientUpdate(cid, 1, {"linear_1.weight": torch.tensor([move])}, {}) for cid, move in moves.items()]
    bounded = build_strategy("fedavg", {"norm_bound": 1.5}).aggregate(global_params, updates)
    torch.testing.assert_close(bounded["linear_1.weight"], torch.tensor([[2.0 / 5, 4.0 / 5]]))
    still = [update for update in updates if update.client_id.startswith("still")]  # nobody moved: nothing to bound
    torch.testing.assert_close(build_strategy("fedavg", {"norm_bound": 1.5}).aggregate(global_params, still),
                               global_params)


def test_sum_of_squares_is_float64_accurate_and_survives_float32_overflow() -> None:
    gen = torch.Generator().manual_seed(0)
    large = torch.randn(4096, 4097, generator=gen) + 3.0  # the 7B layer's size: one float32 sum is off by 1e-4
    exact = float(large.double().square().sum())
    assert sum_of_squares(large) == pytest.approx(exact, rel=1e-6)
    assert sum_of_squares(torch.full((4,), 2.0)) == 16.0  # a 1-D tensor is one row
    huge = torch.tensor([[3e19, 4e19], [1.0, 0.0]])  # float32 squares overflow; the float64 sum does not
    assert sum_of_squares(huge) == pytest.approx(float(huge.double().square().sum()), rel=1e-12)
    assert sum_of_squares(torch.tensor([[math.inf, 0.0]])) == math.inf


def test_the_survey_forms_every_clients_deltas_in_one_buffer(monkeypatch) -> None:
    """A fresh delta tensor per client and key has its pages faulted in anew each time (docs/decisions.md)."""
    gen = torch.Generator().manual_seed(0)
    global_params = random_params(MLP, gen)
    updates = [ClientUpdate(f"c{k}", 10, random_params(MLP, gen), {}) for k in range(3)]
    scratches: list[torch.Tensor] = []
    measured = strategies_base._measured

    def spy(part, update, base, scratch):
        scratches.append(scratch)
        return measured(part, update, base, scratch)

    monkeypatch.setattr(strategies_base, "_measured", spy)
    order = strategies_base.survey(global_params, updates)
    assert len(scratches) == 3 and len({scratch.data_ptr() for scratch in scratches}) == 1  # one for all clients
    for part, update in zip(order, updates):
        exact = math.sqrt(sum(float((update.params[key].double() - value.double()).square().sum())
                              for key, value in global_params.items()))
        assert part.norm == pytest.approx(exact, rel=1e-6)
    last_key = list(global_params)[-1]  # the last delta formed: the last client's last tensor, in the scratch
    delta = updates[-1].params[last_key] - global_params[last_key]
    assert torch.equal(scratches[-1][:delta.numel()].view(delta.shape), delta)


def test_every_strategy_accepts_a_norm_bound() -> None:
    for name in [name for name in available_strategies() if name != "fedcmp-no-norm-bound"]:  # it pins inf
        default = math.inf if not name.startswith("fedcmp") else 1.5  # on by default for Fed-CMP
        assert hyper_parameters(name)["norm_bound"] == default
        assert build_strategy(name).norm_bound == default
        assert build_strategy(name, {"norm_bound": 3.0}).norm_bound == 3.0
        for bad in (0.0, -1.0, math.nan):
            with pytest.raises(ValueError, match=f"strategy '{name}': hyper-parameter norm_bound=.* must be > 0"):
                build_strategy(name, {"norm_bound": bad})


def test_fedcmp_no_norm_bound_pins_the_bound_off() -> None:
    assert "norm_bound" not in hyper_parameters("fedcmp-no-norm-bound")
    assert hyper_parameters("fedcmp-no-norm-bound") == {k: v for k, v in hyper_parameters("fedcmp").items()
                                                         if k != "norm_bound"}
    assert math.isinf(build_strategy("fedcmp-no-norm-bound", {"rho": 0.3, "beta": 0.5}).norm_bound)
    with pytest.raises(ValueError, match=r"strategy 'fedcmp-no-norm-bound' pins norm_bound = inf; do not pass"):
        build_strategy("fedcmp-no-norm-bound", {"norm_bound": 1.5})


def test_fedcmp_no_norm_bound_lets_a_100x_update_through() -> None:
    global_params, updates = random_round(MLP, 6, seed=21)
    outlier = {key: global_params[key] + 100.0 * (updates[0].params[key] - global_params[key]) for key in MLP}
    updates[-1] = dataclasses.replace(updates[-1], params=outlier)  # 100x client 0's move, same direction

    def shift(name: str, params: dict[str, float] | None = None) -> float:
        new = build_strategy(name, params).aggregate(global_params, updates)
        return float(torch.linalg.vector_norm(flat(new) - flat(global_params)))

    honest = max(float(torch.linalg.vector_norm(flat(u.params) - flat(global_params))) for u in updates[:-1])
    assert shift("fedcmp") < 2 * honest  # the default bound clips it to 1.5x the median move
    assert shift("fedcmp-no-norm-bound") > 5 * honest  # unclipped, it drags the aggregate along
    assert shift("fedcmp-no-norm-bound") == shift("fedcmp", {"norm_bound": math.inf})  # Fed-CMP with the bound off


# --- FedAvgM and FedOpt: two rounds by hand ----------------------------------------------

W0 = [1.0, -2.0]
# Round 1: client a (n=1) moves by [0.2, -0.4], client b (n=3) by [0.6, 0.0]:
#   Delta_1 = 0.25*[0.2, -0.4] + 0.75*[0.6, 0.0] = [0.5, -0.1]
# Round 2: both clients move by [-0.1, 0.3]: Delta_2 = [-0.1, 0.3]
D1 = [0.5, -0.1]
D2 = [-0.1, 0.3]


def two_rounds(name: str, params: dict[str, float] | None = None) -> tuple[list[float], list[float]]:
    strategy = build_strategy(name, params)
    w = {"linear_1.weight": torch.tensor([W0])}
    results = []
    for moves in ([[0.2, -0.4], [0.6, 0.0]], [[-0.1, 0.3], [-0.1, 0.3]]):
        updates = [
            ClientUpdate(cid, n, {"linear_1.weight": w["linear_1.weight"] + torch.tensor([move])}, {})
            for cid, n, move in zip(("a", "b"), (1, 3), moves)
        ]
        w = strategy.aggregate(w, updates)
        results.append(w["linear_1.weight"][0].tolist())
    return results[0], results[1]


def test_fedavgm_two_rounds() -> None:
    # eta = 1, beta = 0.9; g_t = -Delta_t; v_1 = g_1; v_2 = 0.9 v_1 + g_2; w <- w - eta v
    w1, w2 = two_rounds("fedavgm")
    v1 = [-d for d in D1]
    expected_w1 = [w - v for w, v in zip(W0, v1)]  # [1.5, -2.1]
    v2 = [0.9 * v - d for v, d in zip(v1, D2)]
    expected_w2 = [w - v for w, v in zip(expected_w1, v2)]  # [1.85, -1.89]
    assert w1 == pytest.approx(expected_w1, abs=1e-6)
    assert w2 == pytest.approx(expected_w2, abs=1e-6)
    assert expected_w2 == pytest.approx([1.85, -1.89])


def test_fedadam_two_rounds_with_bias_correction() -> None:
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-9
    w1, w2 = two_rounds("fedadam")
    m1 = [(1 - b1) * d for d in D1]
    v1 = [(1 - b2) * d * d for d in D1]
    eta_1 = eta * math.sqrt(1 - b2) / (1 - b1)  # = 0.1
    expected_w1 = [w + eta_1 * m / (math.sqrt(v) + tau) for w, m, v in zip(W0, m1, v1)]  # ~ w0 + 0.1 sign(D1)
    m2 = [b1 * m + (1 - b1) * d for m, d in zip(m1, D2)]
    v2 = [b2 * v + (1 - b2) * d * d for v, d in zip(v1, D2)]
    eta_2 = eta * math.sqrt(1 - b2**2) / (1 - b1**2)
    expected_w2 = [w + eta_2 * m / (math.sqrt(v) + tau) for w, m, v in zip(expected_w1, m2, v2)]
    assert expected_w1 == pytest.approx([1.1, -2.1])
    assert w1 == pytest.approx(expected_w1, abs=1e-6)
    assert w2 == pytest.approx(expected_w2, abs=1e-6)


def test_fedyogi_two_rounds() -> None:
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    w1, w2 = two_rounds("fedyogi")

    def sign(x: float) -> float:
        return float(x > 0) - float(x < 0)

    m1 = [(1 - b1) * d for d in D1]
    v1 = [0.0 - (1 - b2) * d * d * sign(0.0 - d * d) for d in D1]  # = 0.01 d^2
    expected_w1 = [w + eta * m / (math.sqrt(v) + tau) for w, m, v in zip(W0, m1, v1)]
    m2 = [b1 * m + (1 - b1) * d for m, d in zip(m1, D2)]
    v2 = [v - (1 - b2) * d * d * sign(v - d * d) for v, d in zip(v1, D2)]
    expected_w2 = [w + eta * m / (math.sqrt(v) + tau) for w, m, v in zip(expected_w1, m2, v2)]
    assert w1 == pytest.approx(expected_w1, abs=1e-6)
    assert w2 == pytest.approx(expected_w2, abs=1e-6)


def test_fedadagrad_two_rounds() -> None:
    eta, tau = 0.1, 1e-9  # beta_1 = 0: m_t = Delta_t
    w1, w2 = two_rounds("fedadagrad")
    v1 = [d * d for d in D1]
    expected_w1 = [w + eta * d / (math.sqrt(v) + tau) for w, d, v in zip(W0, D1, v1)]
    v2 = [v + d * d for v, d in zip(v1, D2)]
    expected_w2 = [w + eta * d / (math.sqrt(v) + tau) for w, d, v in zip(expected_w1, D2, v2)]
    assert w1 == pytest.approx(expected_w1, abs=1e-6)
    assert w2 == pytest.approx(expected_w2, abs=1e-6)
    assert w2[0] == pytest.approx(1.1 - 0.1 * 0.1 / math.sqrt(0.26), abs=1e-6)


def test_fedadagrad_with_momentum() -> None:
    w1, w2 = two_rounds("fedadagrad", {"beta_1": 0.5})
    m1 = [0.5 * d for d in D1]
    expected_w1 = [w + 0.1 * m / (abs(d) + 1e-9) for w, m, d in zip(W0, m1, D1)]
    m2 = [0.5 * m + 0.5 * d for m, d in zip(m1, D2)]
    expected_w2 = [w + 0.1 * m / math.sqrt(a * a + b * b) for w, m, a, b in zip(expected_w1, m2, D1, D2)]
    assert w1 == pytest.approx(expected_w1, abs=1e-6)
    assert w2 == pytest.approx(expected_w2, abs=1e-6)


# --- Fed-CMP properties (docs/algorithm.md) -------------------------------------------------


@pytest.mark.parametrize(
    ("shapes", "extra"),
    [(MLP, {"lam": 1.0}), (MLP, {"lam": 0.0}), (MLP, {"lam": 0.3}), (TALL, SKETCH)],
    ids=["mlp-lam1", "mlp-lam0", "mlp-lam0.3", "sketch-lam1"],
)
def test_fedcmp_fedavg_setting_reproduces_fedavg(shapes: dict, extra: dict) -> None:
    fedcmp = build_strategy("fedcmp", FEDAVG_SETTING | extra)
    fedavg = build_strategy("fedavg")
    for seed in range(3):  # several rounds: state must not leak into the FedAvg setting
        global_params, updates = random_round(shapes, 5, seed)
        assert max_abs_diff(fedcmp.aggregate(global_params, updates), fedavg.aggregate(global_params, updates)) < 1e-6


def test_fedcmp_fedavg_setting_without_residual_needs_the_top_subspace() -> None:
    # tau = 1 keeps every direction of the range, so any basis passes the test above. Here the
    # clients' deltas share a 2-dim column space of R^6 and tau < 1: U_t keeps r = 2 directions,
    # and with lam = 0 (no residual) FedAvg comes out only if they are the top ones.
    gen = torch.Generator().manual_seed(30)
    global_params = random_params(MLP, gen)
    span = {prefix: torch.randn(6, 2, generator=gen) for prefix in ("linear_1", "linear_2")}  # [m, 2] per layer
    deltas = [{key: span[key.split(".")[0]] @ torch.randn(2, *shape[1:], generator=gen) for key, shape in MLP.items()}
              for _ in range(5)]
    updates = make_updates(global_params, deltas, [5, 10, 20, 40, 10])
    fedcmp = build_strategy("fedcmp", FEDAVG_SETTING | {"lam": 0.0, "tau": 0.999})
    result = fedcmp.aggregate(global_params, updates)
    assert {u.shape[1] for key, u in fedcmp.state_dict().items() if key.startswith("basis/")} == {2}  # r = 2 < m = 6
    assert max_abs_diff(result, build_strategy("fedavg").aggregate(global_params, updates)) < 1e-5


def test_fedcmp_no_reliability_uses_sample_weights() -> None:
    # w = p via the ablation's own pinned T and gamma: alpha = 1, tau = 1, rho = inf, beta = 0 leave plain FedAvg.
    global_params, updates = random_round(MLP, 4, seed=3)
    plain = {"alpha": 1.0, "tau": 1.0, "rho": math.inf, "beta": 0.0, "eta_s": 1.0}
    ablation = build_strategy("fedcmp-no-reliability", plain)
    expected = build_strategy("fedavg").aggregate(global_params, updates)
    assert max_abs_diff(ablation.aggregate(global_params, updates), expected) < 1e-6


REFERENCE = {"alpha": 0.5, "tau": 0.9, "temperature": 0.2, "kappa": 1.0, "gamma": 1.0, "rho": 0.3, "lam": 0.5,
             "beta": 0.5, "eta_s": 0.8, "norm_bound": 1.5}


def reference_fedcmp_round(global_params: Params, updates: Sequence[ClientUpdate], hp: dict[str, float],
                           momentum: dict[str, torch.Tensor]) -> Params:
    """One Fed-CMP round from docs/algorithm.md's formulas, written plainly (float64, loops, n x n matrices).

    Exact path only (Q = I); `momentum` maps a layer's weight key to M_{t-1} and is updated in place.
    """
    def matrix(params: Params, prefix: str) -> torch.Tensor:
        return torch.cat([params[f"{prefix}.weight"], params[f"{prefix}.bias"][:, None]], dim=1).double()

    prefixes = sorted({key.rsplit(".", 1)[0] for key in global_params})
    deltas = [{pre: matrix(u.params, pre) - matrix(global_params, pre) for pre in prefixes} for u in updates]
    norms = [math.sqrt(sum(float(d.square().sum()) for d in delta.values())) for delta in deltas]
    limit = hp["norm_bound"] * statistics.median(norm for norm, u in zip(norms, updates) if u.num_samples > 0)
    clipped = [{pre: d * min(1.0, limit / norm) for pre, d in delta.items()} for delta, norm in zip(deltas, norms)]
    counts = torch.tensor([float(u.num_samples) ** hp["alpha"] for u in updates], dtype=torch.float64)
    p = counts / counts.sum()
    result: Params = {}
    for pre in prefixes:
        d = [delta[pre] for delta in clipped]  # D_k [m, n]
        gram = sum(p[k] * d[k] @ d[k].T for k in range(len(d)))
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values.flip(0), vectors.flip(1)
        energy = torch.cumsum(values, 0)
        rank = int(torch.nonzero(energy >= hp["tau"] * float(torch.trace(gram)))[0]) + 1
        u = vectors[:, :rank]  # U_t [m, r]
        c = [u.T @ dk for dk in d]  # C_k [r, n]
        fidelity = [float(ck.square().sum() / dk.square().sum()) for ck, dk in zip(c, d)]
        whole = [ck.flatten() / ck.norm() for ck in c]  # the vote looks at each client's whole C_k
        consensus = sum(p[k] * whole[k] for k in range(len(c)))
        agree = [float(unit @ consensus / consensus.norm()) for unit in whole]
        median = statistics.median_low(agree)
        sigma = 1.4826 * statistics.median_low([abs(a - median) for a in agree])
        excess = [max(0.0, -a - hp["kappa"] * sigma) for a in agree]
        w = torch.tensor([p[k] * fidelity[k] ** hp["gamma"] * math.exp(-excess[k] / hp["temperature"])
                          for k in range(len(c))], dtype=torch.float64)
        w = w / w.sum()
        fused = torch.zeros(rank, d[0].shape[1], dtype=torch.float64)
        for i in range(rank):
            units = [ck[i] / ck[i].norm() for ck in c]
            h = sum(w[k] * torch.outer(units[k], units[k]) for k in range(len(c)))  # H_i [n, n]
            target = sum(w[k] * c[k][i] for k in range(len(c)))
            fused[i] = (1 + hp["rho"]) * torch.linalg.solve(h + hp["rho"] * torch.eye(len(target), dtype=torch.float64),
                                                            target)
        mean_c = sum(p[k] * c[k] for k in range(len(c)))
        mean_d = sum(p[k] * d[k] for k in range(len(d)))
        step = u @ (fused - hp["lam"] * mean_c) + hp["lam"] * mean_d  # Dhat_t
        if pre in momentum:
            step = step + hp["beta"] * u @ (u.T @ momentum[pre])
        momentum[pre] = step
        new = matrix(global_params, pre) + hp["eta_s"] * step
        result[f"{pre}.weight"], result[f"{pre}.bias"] = new[:, :-1].float(), new[:, -1].float()
    return result


def test_fedcmp_matches_the_documented_formulas() -> None:
    """Every term of docs/algorithm.md counts: dropping one (fidelity, vote, ridge, residual, momentum,
    norm bound, the top-r basis) makes this fail."""
    gen = torch.Generator().manual_seed(21)
    global_params = random_params(MLP, gen)
    strategy, momentum = build_strategy("fedcmp", REFERENCE), {}
    for _ in range(2):  # the second round carries momentum
        deltas = random_deltas(MLP, 6, gen)
        deltas[4] = {key: -3.0 * value for key, value in deltas[0].items()}  # opposing: the vote fires
        deltas[5] = {key: 4.0 * value for key, value in deltas[5].items()}  # long: the norm bound clips it
        updates = make_updates(global_params, deltas, [5, 10, 20, 40, 10, 10])
        expected = reference_fedcmp_round(global_params, updates, REFERENCE, momentum)
        global_params = strategy.aggregate(global_params, updates)
        assert max_abs_diff(global_params, expected) < 1e-4


def test_significant_disagreement_flags_only_moves_against_the_consensus() -> None:
    agreement = torch.tensor([0.5, 0.0, -0.1, -1.0])  # a [K]: agreeing, orthogonal, slightly against, opposed
    moved = torch.ones(4, dtype=torch.bool)
    # lower median -0.1; |a + 0.1| = 0.6, 0.1, 0, 0.9 -> lower median 0.1, sigma = 0.14826
    excess = significant_disagreement(agreement, moved, kappa=2.0)
    torch.testing.assert_close(excess, torch.tensor([0.0, 0.0, 0.0, 1.0 - 2 * 0.14826]))
    torch.testing.assert_close(significant_disagreement(agreement, moved, kappa=0.0),
                               torch.tensor([0.0, 0.0, 0.1, 1.0]))
    assert torch.equal(significant_disagreement(agreement, moved, kappa=20.0), torch.zeros(4))
    still = torch.tensor([True, True, True, False])  # a client that did not move is never flagged
    assert torch.equal(significant_disagreement(agreement, still, kappa=2.0), torch.zeros(4))


def test_the_vote_spares_an_honest_client_opposing_one_row_and_drops_an_opposing_client() -> None:
    shared, own = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.5, 0.0])
    gen = torch.Generator().manual_seed(4)
    honest = [torch.stack([shared, sign * own]) + 0.01 * torch.randn(2, 3, generator=gen)
              for sign in (1.0, 1.0, 1.0, 1.0, -1.0)]  # C_k [r = 2, n = 3]; client 4 opposes row 1 only
    attacker = -2.0 * torch.stack(honest).mean(dim=0)  # against the honest move on every row
    p = torch.full((6,), 1 / 6)
    weights = reliability_weights(Rows.of(torch.stack([*honest, attacker])), p, torch.ones(6), temperature=0.1,
                                  gamma=0.0, kappa=2.0)  # w [K, r]
    torch.testing.assert_close(weights[:5], torch.full((5, 2), 0.2), atol=1e-4, rtol=0)  # honest: p, renormalised
    assert float(weights[5].max()) < 1e-4  # the attacker: exp(-e / T) with e near 1


def test_fedcmp_vote_costs_nothing_when_no_client_disagrees_significantly() -> None:
    global_params, updates = random_round(MLP, 5, seed=22)
    ablation = build_strategy("fedcmp-no-reliability").aggregate(global_params, updates)
    calm = build_strategy("fedcmp", {"kappa": 1e6}).aggregate(global_params, updates)  # no row beyond kappa sigma
    assert max_abs_diff(calm, ablation) == 0.0
    outlier = make_updates(global_params, [{k: -3.0 * (u.params[k] - global_params[k]) for k in MLP}
                                           for u in updates[:1]], [10])
    attacked = [*updates, dataclasses.replace(outlier[0], client_id="mallory")]
    assert max_abs_diff(build_strategy("fedcmp").aggregate(global_params, attacked),
                        build_strategy("fedcmp-no-reliability").aggregate(global_params, attacked)) > 1e-3


@pytest.mark.parametrize(("shapes", "extra"), [(MLP, {}), (MLP, {"norm_bound": math.inf}), (TALL, SKETCH)],
                         ids=["exact", "unbounded", "sketch"])
def test_fedcmp_is_finite_for_any_finite_update(shapes: dict, extra: dict) -> None:
    global_params, updates = random_round(shapes, 5, seed=23)
    huge = {key: torch.full_like(value, 1e19) for key, value in global_params.items()}
    at_the_limit = {key: torch.full_like(value, 3e38) for key, value in global_params.items()}  # W^k - W overflows
    for params in (huge, at_the_limit):
        negative = {key: -1e31 * torch.ones_like(value) for key, value in global_params.items()}
        for base in (global_params, negative):
            attacked = [*make_updates(base, [{k: u.params[k] - global_params[k] for k in shapes} for u in updates],
                                      [u.num_samples for u in updates]),
                        ClientUpdate("mallory", 10, params, {"steps": STEPS})]
            result = build_strategy("fedcmp", extra).aggregate(base, attacked)
            assert all(torch.isfinite(tensor).all() for tensor in result.values())
    poisoned = ClientUpdate("mallory", 10, dict(global_params, **{"linear_1.bias": torch.full(shapes["linear_1.bias"], math.nan)}), {})
    with pytest.raises(ValueError, match="client 'mallory' holds non-finite values"):
        build_strategy("fedcmp", extra).aggregate(global_params, [*updates, poisoned])


@pytest.mark.parametrize(("shapes", "extra"), [(MLP, {}), (TALL, SKETCH)], ids=["exact", "sketch"])
def test_fedcmp_alpha_zero_counts_every_client_alike(shapes: dict, extra: dict) -> None:
    # alpha = 0: p_k = 1/K whatever the sample counts, i.e. alpha = 1 on equal counts; the step
    # differs from alpha = 1 when the counts differ.
    global_params, updates = random_round(shapes, 4, seed=11)
    assert len({u.num_samples for u in updates}) > 1
    equal_counts = [dataclasses.replace(u, num_samples=7) for u in updates]
    uniform = build_strategy("fedcmp", {"alpha": 0.0} | extra).aggregate(global_params, updates)
    assert max_abs_diff(uniform, build_strategy("fedcmp", {"alpha": 1.0} | extra).aggregate(global_params, equal_counts)) < 1e-5
    assert max_abs_diff(uniform, build_strategy("fedcmp", {"alpha": 1.0} | extra).aggregate(global_params, updates)) > 1e-3
    # A client that trained on nothing weighs nothing, at alpha = 0 too.
    idle = ClientUpdate("client-9", 0, {key: 2.0 * value for key, value in updates[0].params.items()}, {})
    with_idle = build_strategy("fedcmp", {"alpha": 0.0} | extra).aggregate(global_params, [*updates, idle])
    assert max_abs_diff(with_idle, uniform) < 1e-5


@pytest.mark.parametrize(("shapes", "extra"), [(MLP, {}), (TALL, SKETCH)], ids=["exact", "sketch"])
def test_fedcmp_basis_is_orthonormal(shapes: dict, extra: dict) -> None:
    strategy = build_strategy("fedcmp", extra)
    global_params, updates = random_round(shapes, 6, seed=4)
    strategy.aggregate(global_params, updates)
    bases = {k: v for k, v in strategy.state_dict().items() if k.startswith("basis/")}
    assert bases.keys() == {f"basis/{layer.name}" for layer in group_layers(global_params)}
    for u in bases.values():
        assert 1 <= u.shape[1] <= strategy.r_max
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)


def test_select_rank_energy_fraction_and_cap() -> None:
    ritz = torch.tensor([5.0, 3.0, 2.0, 0.0])  # descending; trace 10
    assert select_rank(ritz, 10.0, 0.5, 64) == 1
    assert select_rank(ritz, 10.0, 0.8, 64) == 2
    assert select_rank(ritz, 10.0, 0.81, 64) == 3
    assert select_rank(ritz, 10.0, 0.95, 2) == 2  # r_max caps
    assert select_rank(ritz, 10.0, 1.0, 64) == 4  # tau = 1: every direction of the range
    assert select_rank(ritz, 20.0, 0.9, 64) == 4  # the range holds too little energy: all of it
    assert select_rank(torch.zeros(4), 0.0, 0.95, 64) == 0  # nothing moved


def test_fedcmp_sketch_finds_the_top_subspace() -> None:
    """On the sketch path U captures (almost) the energy of the exact top-r eigenvectors of G."""
    global_params, updates = random_round(TALL, 6, seed=14)
    # s = 12, m = 40 > 2s; alpha = 1: G weighs clients by their sample shares, as computed here
    strategy = build_strategy("fedcmp", {"alpha": 1.0, "tau": 0.9, "r_max": 4, "oversample": 8})
    strategy.aggregate(global_params, updates)
    u = strategy.state_dict()["basis/linear_1.weight"]  # [40, r]
    total = sum(x.num_samples for x in updates)
    weighted = []  # (p_k, D_k = [W_k - W | b_k - b])
    for x in updates:
        weight = x.params["linear_1.weight"] - global_params["linear_1.weight"]
        bias = x.params["linear_1.bias"] - global_params["linear_1.bias"]
        weighted.append((x.num_samples / total, torch.cat([weight, bias[:, None]], dim=1)))
    gram = sum(p * d @ d.T for p, d in weighted)
    exact = torch.linalg.eigvalsh(gram).flip(0)[: u.shape[1]].sum()
    captured = sum(p * (u.T @ d).square().sum() for p, d in weighted)
    assert 2 <= u.shape[1] <= 4
    assert float(captured) >= 0.999 * float(exact)


@pytest.mark.parametrize(("shapes", "extra"), [(MLP, {"tau": 0.8}), (TALL, SKETCH)], ids=["exact", "sketch"])
def test_fedcmp_momentum_stays_in_span_without_residual(shapes: dict, extra: dict) -> None:
    strategy = build_strategy("fedcmp", {"lam": 0.0, "beta": 0.9} | extra)
    global_params = random_round(shapes, 1, seed=0)[0]
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        updates = make_updates(global_params, random_deltas(shapes, 5, gen), [10, 20, 30, 40, 50])
        global_params = strategy.aggregate(global_params, updates)
        state = strategy.state_dict()
        for layer in group_layers(global_params):
            u, m = state[f"basis/{layer.name}"], state[f"momentum/{layer.name}"]
            assert u.shape[1] < u.shape[0]  # a proper subspace, so the check has teeth
            outside = m - u @ (u.T @ m)  # (I - U U^T) M
            assert float(outside.norm()) <= 1e-5 * float(m.norm())


@pytest.mark.parametrize(("shapes", "extra"), [(MLP, {}), (TALL, SKETCH)], ids=["exact", "sketch"])
def test_fedcmp_client_order_invariance(shapes: dict, extra: dict) -> None:
    global_params, updates = random_round(shapes, 6, seed=5)
    permuted = [updates[i] for i in (3, 0, 5, 1, 4, 2)]
    first, second = build_strategy("fedcmp", extra), build_strategy("fedcmp", extra)
    for _ in range(2):  # the second round exercises the momentum as well
        a = first.aggregate(global_params, updates)
        b = second.aggregate(global_params, permuted)
        assert all(torch.equal(a[key], b[key]) for key in a)


def rows(*vectors: list[float]) -> torch.Tensor:
    """Client rows of one canonical direction: C [K, 1, n]."""
    return torch.tensor(vectors, dtype=torch.float32)[:, None, :]


@pytest.mark.parametrize("rho", [0.05, 0.3, 2.0])
def test_overlap_fusion_keeps_a_shared_move_and_adds_orthogonal_ones(rho: float) -> None:
    weights = torch.tensor([[0.5], [0.3], [0.2]])  # w [K, r]
    shared = rows([1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [1.0, 2.0, 0.0])
    assert torch.allclose(overlap_fusion(Rows.of(shared), weights, rho), shared[0], atol=1e-6)  # not shrunk, not inflated
    orthogonal = rows([2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, -1.0])
    expected = sum((1 + rho) * w / (w + rho) * c for w, c in zip(weights[:, 0], orthogonal))  # -> sum as rho -> 0
    assert torch.allclose(overlap_fusion(Rows.of(orthogonal), weights, rho), expected, atol=1e-6)
    fused = overlap_fusion(Rows.of(orthogonal), weights, rho)[0]
    for k in range(3):  # along its own direction, no client is moved further than it moved itself
        own = orthogonal[k, 0] / orthogonal[k, 0].norm()
        assert 0.0 < float(fused @ own) <= float(orthogonal[k, 0].norm()) + 1e-6


def test_overlap_fusion_cancels_opposing_moves_and_ignores_zero_rows() -> None:
    weights = torch.tensor([[0.4], [0.4], [0.2]])
    opposing = rows([1.0, -1.0], [-1.0, 1.0], [0.0, 0.0])
    assert torch.allclose(overlap_fusion(Rows.of(opposing), weights, 0.1), torch.zeros(1, 2), atol=1e-6)
    coef = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))  # [K, r, n]
    weights = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), dim=0)
    mean = torch.einsum("kr,krn->rn", weights, coef)
    assert torch.equal(overlap_fusion(Rows.of(coef), weights, math.inf), mean)  # rho = inf: the weighted mean
    assert torch.allclose(overlap_fusion(Rows.of(coef), weights, 1e6), mean, atol=1e-4)  # and its limit
    with_zero = torch.cat([coef, torch.zeros(1, 3, 5)])  # a client that did not move along any direction
    padded = torch.cat([weights * 0.75, torch.full((1, 3), 0.25)])
    assert torch.isfinite(overlap_fusion(Rows.of(with_zero), padded, 0.1)).all()


def test_fedcmp_single_client_and_zero_updates() -> None:
    global_params, updates = random_round(MLP, 1, seed=8)
    result = build_strategy("fedcmp", {"eta_s": 1.0}).aggregate(global_params, updates)
    # K = 1, lam = 1, any rho: Chat = C, Dhat = U C + (D - U C) = D, the client's own projector
    assert max_abs_diff(result, updates[0].params) < 1e-5

    standing_still = [ClientUpdate(f"c{k}", 5, dict(global_params), {}) for k in range(3)]
    for params in ({}, {"temperature": math.inf}, {"gamma": 3.0, "temperature": 0.01}):
        strategy = build_strategy("fedcmp", params)
        assert max_abs_diff(strategy.aggregate(global_params, standing_still), global_params) == 0.0
        mixed = standing_still + updates  # zero and non-zero updates together
        assert all(torch.isfinite(t).all() for t in strategy.aggregate(global_params, mixed).values())


def test_fedcmp_handles_linear_projector_and_lone_tensors() -> None:
    shapes = {"linear_1.weight": (7, 5), "linear_1.bias": (7,), "scale": (3,), "mix.weight": (4, 4)}
    global_params, updates = random_round(shapes, 4, seed=9)
    layers = {layer.keys for layer in group_layers(global_params)}
    assert layers == {("linear_1.weight", "linear_1.bias"), ("mix.weight",), ("scale",)}
    fedcmp = build_strategy("fedcmp", FEDAVG_SETTING | {"lam": 0.0})
    fedavg = build_strategy("fedavg")
    assert max_abs_diff(fedcmp.aggregate(global_params, updates), fedavg.aggregate(global_params, updates)) < 1e-6


# --- every strategy: durability, contract, streaming ----------------------------------------

CASES = [(name, {}, MLP) for name in available_strategies()] + [
    ("fedcmp", SKETCH, TALL), ("fedavg", {"norm_bound": 1.0}, MLP), ("fedcmp", {"norm_bound": math.inf}, MLP)]
CASE_IDS = [*available_strategies(), "fedcmp-sketch", "fedavg-norm-bound", "fedcmp-unbounded"]


def run_rounds(strategy: Strategy, global_params: Params, rounds: list[tuple[list[Params], list[int]]]) -> list[Params]:
    results = []
    for deltas, samples in rounds:
        global_params = strategy.aggregate(global_params, make_updates(global_params, deltas, samples))
        results.append(global_params)
    return results


@pytest.mark.parametrize(("name", "params", "shapes"), CASES, ids=CASE_IDS)
def test_durability_bit_identical_after_safetensors_round_trip(name: str, params: dict, shapes: dict) -> None:
    gen = torch.Generator().manual_seed(10)
    start = random_params(shapes, gen)
    rounds = [(random_deltas(shapes, 4, gen), torch.randint(1, 30, (4,), generator=gen).tolist()) for _ in range(4)]

    straight = run_rounds(build_strategy(name, params), start, rounds)

    first = build_strategy(name, params)
    before = run_rounds(first, start, rounds[:2])
    state = first.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    blob = st_save(state)
    resumed = build_strategy(name, params)
    resumed.load_state_dict(st_load(blob))
    after = run_rounds(resumed, before[-1], rounds[2:])

    for expected, got in zip(straight, before + after):
        assert all(torch.equal(expected[key], got[key]) for key in expected)
    final_state = resumed.state_dict()
    reference = build_strategy(name, params)
    run_rounds(reference, start, rounds)
    assert final_state.keys() == reference.state_dict().keys()
    assert all(torch.equal(final_state[k], reference.state_dict()[k]) for k in final_state)


def test_round_counter_is_int64_scalar() -> None:
    for name in available_strategies():
        state = build_strategy(name).state_dict()
        if "round" in state:
            assert state["round"].dtype == torch.int64 and state["round"].numel() == 1


@pytest.mark.parametrize(("name", "params", "shapes"), CASES, ids=CASE_IDS)
def test_contract_fresh_float32_outputs_and_untouched_inputs(name: str, params: dict, shapes: dict) -> None:
    global_params, updates = random_round(shapes, 3, seed=11)
    global_copy = {k: v.clone() for k, v in global_params.items()}
    update_copies = [{k: v.clone() for k, v in u.params.items()} for u in updates]
    strategy = build_strategy(name, params)
    assert isinstance(strategy, Strategy) and strategy.name == name
    for _ in range(2):
        result = strategy.aggregate(global_params, updates)
    assert result.keys() == global_params.keys()
    for key, tensor in result.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert tensor.shape == global_params[key].shape and tensor.is_contiguous()
        assert tensor.data_ptr() not in {global_params[key].data_ptr(), *(u.params[key].data_ptr() for u in updates)}
        assert torch.isfinite(tensor).all()
    assert all(torch.equal(global_params[k], global_copy[k]) for k in global_copy)
    assert all(torch.equal(u.params[k], c[k]) for u, c in zip(updates, update_copies) for k in c)


class LazyUpdates(Sequence[ClientUpdate]):
    """Materialises an update (fresh tensors) on each access and tracks how many are alive."""

    def __init__(self, updates: list[ClientUpdate]) -> None:
        self._stored = [(u.client_id, u.num_samples, {k: v.clone() for k, v in u.params.items()}, u.metrics)
                        for u in updates]
        self.alive: dict[int, int] = {}  # access id -> live tensors
        self.max_alive = 0
        self.loads = 0

    def __len__(self) -> int:
        return len(self._stored)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("strategies index one update at a time")
        client_id, n, params, metrics = self._stored[index]
        self.loads += 1
        access = self.loads
        fresh = {k: v.clone() for k, v in params.items()}
        self.alive[access] = len(fresh)
        for tensor in fresh.values():
            weakref.finalize(tensor, self._release, access)
        self.max_alive = max(self.max_alive, len(self.alive))
        return ClientUpdate(client_id, n, fresh, dict(metrics))

    def _release(self, access: int) -> None:
        self.alive[access] -= 1
        if self.alive[access] == 0:
            del self.alive[access]


@pytest.mark.parametrize(("name", "params", "shapes"), CASES, ids=CASE_IDS)
def test_streams_over_a_lazy_sequence(name: str, params: dict, shapes: dict) -> None:
    global_params, updates = random_round(shapes, 5, seed=12)  # client-0 .. client-4: sorted
    expected = build_strategy(name, params).aggregate(global_params, updates)
    passes = 2 if params == SKETCH else 1  # accumulation passes: the sketch path reads every client twice
    # A norm bound (Fed-CMP always, for its scaled accumulation) needs a survey pass of the norms first.
    surveyed = name.startswith("fedcmp") or math.isfinite(params.get("norm_bound", math.inf))

    lazy = LazyUpdates(updates)
    result = build_strategy(name, params).aggregate(global_params, lazy)
    assert all(torch.equal(result[k], expected[k]) for k in expected)
    assert lazy.max_alive == 1
    assert lazy.loads == (passes + surveyed) * len(updates)

    shuffled = LazyUpdates(updates[::-1])  # not sorted: a metadata pass first (the survey is one), same result
    result = build_strategy(name, params).aggregate(global_params, shuffled)
    assert all(torch.equal(result[k], expected[k]) for k in expected)
    assert shuffled.max_alive == 1
    assert shuffled.loads == (passes + 1) * len(updates) + (0 if surveyed else 2)


# --- validation and registry -----------------------------------------------------------------


def test_rejects_inconsistent_rounds() -> None:
    global_params, updates = random_round(MLP, 2, seed=13)
    strategy = build_strategy("fedavg")
    with pytest.raises(ValueError, match="no client updates"):
        strategy.aggregate(global_params, [])
    with pytest.raises(ValueError, match="duplicate client ids"):
        strategy.aggregate(global_params, [updates[0], updates[0]])
    bad_shape = ClientUpdate("x", 1, dict(updates[0].params, **{"linear_1.bias": torch.zeros(7)}), {})
    with pytest.raises(ValueError, match="linear_1.bias has shape"):
        strategy.aggregate(global_params, [bad_shape])
    missing = ClientUpdate("x", 1, {k: v for k, v in updates[0].params.items() if k != "linear_2.bias"}, {})
    with pytest.raises(ValueError, match="missing \\['linear_2.bias'\\]"):
        strategy.aggregate(global_params, [missing])
    empty = [ClientUpdate(u.client_id, 0, u.params, {}) for u in updates]
    with pytest.raises(ValueError, match="num_samples = 0"):
        strategy.aggregate(global_params, empty)


def test_registry_lists_every_strategy() -> None:
    baselines = ["fedavg", "fedavg-equal", "fedprox", "fedavgm", "fednova", "fedadam", "fedyogi", "fedadagrad"]
    ablations = ["fedcmp-no-reliability", "fedcmp-no-momentum", "fedcmp-mean-fusion", "fedcmp-sample-weights",
                 "fedcmp-no-norm-bound"]
    assert available_strategies() == sorted(baselines + ["fedcmp"] + ablations)


def test_unknown_strategy_lists_known_names() -> None:
    with pytest.raises(ValueError) as err:
        build_strategy("fedsgd")
    assert "fedsgd" in str(err.value)
    assert all(name in str(err.value) for name in available_strategies())


def test_unknown_and_invalid_hyper_parameters_are_rejected() -> None:
    with pytest.raises(ValueError) as err:
        build_strategy("fedadam", {"learning_rate": 0.1})
    assert "learning_rate" in str(err.value) and "beta_2" in str(err.value)
    with pytest.raises(ValueError, match="eta") as err:
        build_strategy("fedyogi", {"eta": -0.1})
    assert "accepted" in str(err.value)
    with pytest.raises(ValueError, match="server_momentum"):
        build_strategy("fedavgm", {"server_momentum": 1.5})
    with pytest.raises(ValueError, match="r_max"):
        build_strategy("fedcmp", {"r_max": 2.5})
    with pytest.raises(ValueError, match="temperature"):
        build_strategy("fedcmp", {"temperature": 0.0})
    with pytest.raises(ValueError, match="tau"):
        build_strategy("fedcmp", {"tau": float("nan")})
    with pytest.raises(ValueError, match="rho"):
        build_strategy("fedcmp", {"rho": 0.0})
    with pytest.raises(ValueError, match=r"alpha=1.5 is invalid: must be in \[0, 1\]"):
        build_strategy("fedcmp", {"alpha": 1.5})
    with pytest.raises(ValueError, match="rho"):  # the ablation fixes rho = inf
        build_strategy("fedcmp-mean-fusion", {"rho": 0.3})
    with pytest.raises(ValueError, match="alpha"):  # the ablation fixes alpha = 1
        build_strategy("fedcmp-sample-weights", {"alpha": 0.0})
    with pytest.raises(ValueError, match="beta"):  # the ablation fixes beta = 0
        build_strategy("fedcmp-no-momentum", {"beta": 0.5})
    with pytest.raises(ValueError, match=r"accepted: \['norm_bound'\]"):  # the one key every strategy has
        build_strategy("fedavg", {"mu": 0.01})


def test_recipe_style_values_are_accepted() -> None:
    # strategy_params is dict[str, float] in the recipe: integers arrive as 64.0, T as inf
    strategy = build_strategy("fedcmp", {"r_max": 32.0, "temperature": float("inf"), "oversample": 4.0})
    assert strategy.r_max == 32 and isinstance(strategy.r_max, int) and math.isinf(strategy.temperature)
    assert build_strategy("fedcmp-no-momentum").beta == 0.0
    ablation = build_strategy("fedcmp-no-reliability")
    assert math.isinf(ablation.temperature) and ablation.gamma == 0.0


def test_load_state_dict_rejects_foreign_state() -> None:
    with pytest.raises(ValueError, match="stateless"):
        build_strategy("fedavg").load_state_dict({"round": torch.tensor(1)})
    with pytest.raises(ValueError, match="unknown entry"):
        build_strategy("fedadam").load_state_dict({"round": torch.tensor(1), "momentum/x": torch.zeros(1)})
    with pytest.raises(ValueError, match="round"):
        build_strategy("fedcmp").load_state_dict({})


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fednova"])
def test_deltas_formed_block_by_block_give_the_mean_of_whole_tensors(monkeypatch, strategy: str) -> None:
    """Blocks of 7 elements cut every tensor mid-row and leave a short last block."""
    gen = torch.Generator().manual_seed(3)
    global_params = {"linear_1.weight": torch.randn(10, 9, generator=gen), "linear_1.bias": torch.randn(10, generator=gen)}
    updates = [ClientUpdate(f"c{k}", k + 1, {key: t + torch.randn(t.shape, generator=gen) for key, t in global_params.items()},
                            {"steps": 1.0}) for k in range(3)]
    whole = build_strategy(strategy, {}).aggregate(global_params, updates)
    monkeypatch.setattr(strategies_base, "BLOCK_ELEMENTS", 7)
    blocked = build_strategy(strategy, {}).aggregate(global_params, updates)
    weights = torch.tensor([1.0, 2.0, 3.0]) / 6.0
    for key, tensor in global_params.items():
        expected = tensor.double() + sum(w * (u.params[key].double() - tensor.double()) for w, u in zip(weights, updates))
        assert torch.allclose(blocked[key].double(), expected, atol=1e-5) and torch.equal(blocked[key], whole[key])


def test_the_committed_steps_norm_is_the_same_in_blocks(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(4)
    old = {"w": torch.randn(13, 5, generator=gen), "b": torch.randn(13, generator=gen)}
    new = {key: t + torch.randn(t.shape, generator=gen) for key, t in old.items()}
    exact = math.sqrt(sum(float((new[k].double() - old[k].double()).pow(2).sum()) for k in old))
    monkeypatch.setattr(strategies_base, "BLOCK_ELEMENTS", 4)
    assert update_norm(old, new) == pytest.approx(exact, rel=1e-6)
