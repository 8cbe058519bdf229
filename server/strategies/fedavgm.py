"""FedAvgM (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification"): FedAvg followed by server SGD with heavy-ball momentum,
as in Flower's `FedAvgM` (PyTorch SGD convention, no Nesterov):

    g_t = W_t - sum_k p_k W_t^k           (pseudo-gradient = -Dbar_t)
    v_t = beta v_{t-1} + g_t              (v_0 = 0, so v_1 = g_1)
    W_{t+1} = W_t - eta v_t

Hyper-parameters (Flower names):
- server_learning_rate (eta) = 1.0
- server_momentum (beta) = 0.9. Flower's default is 0.0, which makes FedAvgM FedAvg; 0.9 is
  the value Hsu et al. recommend and the usual baseline setting.
State: `round` and `momentum/<key>` (v_t per parameter). `mean_step` (Dbar_t) is the hook
FedNova overrides.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import (
    ClientUpdate,
    NormBounded,
    float32,
    join_state,
    mean_delta,
    positive,
    real_hyper,
    split_state,
    unit_interval,
)


class FedAvgM(NormBounded):
    name = "fedavgm"

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.9) -> None:
        self.server_learning_rate = real_hyper("server_learning_rate", server_learning_rate, "> 0", positive)
        self.server_momentum = real_hyper("server_momentum", server_momentum, "in [0, 1)", unit_interval)
        self._round = 0
        self._momentum: dict[str, Tensor] = {}

    def aggregate(self, global_params: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        delta = self.mean_step(global_params, updates)
        momentum: dict[str, Tensor] = {}
        new_params: dict[str, Tensor] = {}
        for key, d in delta.items():
            previous = self._momentum.get(key, torch.zeros_like(d))
            grad = d.neg_()  # g_t = W_t - avg
            momentum[key] = torch.add(grad, previous, alpha=self.server_momentum)  # v_t = beta v + g
            new_params[key] = float32(global_params[key]) - self.server_learning_rate * momentum[key]
        self._momentum = momentum
        self._round += 1
        return new_params

    def mean_step(self, global_params: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        """Dbar_t = sum_k p_k (W_t^k - W_t) per key, fresh tensors."""
        return mean_delta(global_params, updates, self.norm_bound)[1]

    def state_dict(self) -> dict[str, Tensor]:
        return join_state(self._round, {"momentum": self._momentum})

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._round, groups = split_state(state, ["momentum"], self.name)
        self._momentum = groups["momentum"]
