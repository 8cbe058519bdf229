"""FedNova (Wang et al., 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization"): every client's update is divided by its number of local steps
before averaging, then the average is taken tau_eff steps:

    d_t     = sum_k p_k (W_t^k - W_t) / tau_k           p_k = n_k / sum_j n_j,  tau_k = local steps
    tau_eff = sum_k p_k tau_k
    v_t     = beta v_{t-1} + tau_eff d_t                (v_0 = 0)
    W_{t+1} = W_t + eta v_t

tau_k is the `steps` metric the client's trainer reports with its update (a client that trained
on nothing weighs nothing and needs none). beta = 0, eta = 1 is the paper's FedNova with vanilla
local SGD (the server momentum is its "global momentum" option; the heavy-ball rule is FedAvgM's,
with the normalised step in place of Dbar_t). With one-pass local training n_k = tau_k B, so
p_k / tau_k is the same for every client: FedNova is then the equal-weight mean scaled by
K tau_eff / sum_k tau_k (docs/algorithm.md).

Hyper-parameters: server_learning_rate (eta) = 1.0, server_momentum (beta) = 0.0, norm_bound.
State: `round` and `momentum/<key>`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import Tensor

from .base import ClientUpdate, mean_delta
from .fedavgm import FedAvgM

STEPS_METRIC = "steps"


def local_steps(client_id: str, metrics: Mapping[str, float]) -> float:
    """tau_k from a client's metrics; ValueError naming the client when it is missing or < 1."""
    steps = metrics.get(STEPS_METRIC)
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not math.isfinite(steps) or steps < 1:
        raise ValueError(
            f"update of client {client_id!r}: fednova needs the number of local steps as metric "
            f"{STEPS_METRIC!r} (a number >= 1), got {steps!r}"
        )
    return float(steps)


def normalised_weight(update: ClientUpdate) -> float:
    """n_k / tau_k; 0 for a client that trained on nothing."""
    if update.num_samples == 0:
        return 0.0
    return update.num_samples / local_steps(update.client_id, update.metrics)


class FedNova(FedAvgM):
    name = "fednova"

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.0) -> None:
        super().__init__(server_learning_rate=server_learning_rate, server_momentum=server_momentum)

    def mean_step(self, global_params: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        """tau_eff d_t per key: mean_delta's sum_k (n_k / tau_k) D_k / sum_k (n_k / tau_k), rescaled."""
        order, mean = mean_delta(global_params, updates, self.norm_bound, normalised_weight)
        active = [part for part in order if part.num_samples > 0]
        samples = sum(part.num_samples for part in active)  # N
        steps = [local_steps(part.client_id, part.metrics) for part in active]
        tau_eff = sum(part.num_samples * tau for part, tau in zip(active, steps)) / samples
        normaliser = sum(part.num_samples / tau for part, tau in zip(active, steps)) / samples  # sum_k p_k / tau_k
        return {key: tensor.mul_(tau_eff * normaliser) for key, tensor in mean.items()}
