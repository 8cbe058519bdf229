"""FedOpt: the server-side adaptive optimizers of Reddi et al., 2021, "Adaptive Federated
Optimization" (ICLR), with the state handling of Flower's `FedOpt` family.

Every round, per parameter (element-wise):

    Delta_t = sum_k p_k W_t^k - W_t                     (pseudo-gradient, an ascent direction)
    m_t     = beta_1 m_{t-1} + (1 - beta_1) Delta_t     (m_0 = 0)
    v_t     = second_moment(v_{t-1}, Delta_t^2)          (v_0 = 0; Adam / Yogi / Adagrad rule)
    W_{t+1} = W_t + eta_t m_t / (sqrt(v_t) + tau)

eta_t = eta except for FedAdam's bias correction. Subclasses set the v rule, eta_t and the
defaults. State: `round` (t), `m/<key>`, `v/<key>`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
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


class FedOpt(NormBounded, ABC):
    name: str

    def __init__(self, *, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        self.eta = real_hyper("eta", eta, "> 0", positive)
        self.beta_1 = real_hyper("beta_1", beta_1, "in [0, 1)", unit_interval)
        self.beta_2 = real_hyper("beta_2", beta_2, "in [0, 1)", unit_interval)
        self.tau = real_hyper("tau", tau, "> 0", positive)
        self._round = 0
        self._m: dict[str, Tensor] = {}
        self._v: dict[str, Tensor] = {}

    @abstractmethod
    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        """v_t from v_{t-1} and Delta_t^2."""

    def step_size(self, t: int) -> float:
        """eta_t for round t = 1, 2, ..."""
        return self.eta

    def aggregate(self, global_params: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        _, delta = mean_delta(global_params, updates, self.norm_bound)  # Delta_t per key
        t = self._round + 1
        eta_t = self.step_size(t)
        m_new: dict[str, Tensor] = {}
        v_new: dict[str, Tensor] = {}
        new_params: dict[str, Tensor] = {}
        for key, d in delta.items():
            m_prev = self._m.get(key, torch.zeros_like(d))
            v_prev = self._v.get(key, torch.zeros_like(d))
            m_new[key] = self.beta_1 * m_prev + (1.0 - self.beta_1) * d
            v_new[key] = self.second_moment(v_prev, d * d)
            step = m_new[key] / (v_new[key].sqrt() + self.tau)
            new_params[key] = float32(global_params[key]) + eta_t * step
        self._m, self._v, self._round = m_new, v_new, t
        return new_params

    def state_dict(self) -> dict[str, Tensor]:
        return join_state(self._round, {"m": self._m, "v": self._v})

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._round, groups = split_state(state, ["m", "v"], self.name)
        self._m, self._v = groups["m"], groups["v"]
