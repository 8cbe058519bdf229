"""FedAdagrad (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2), as
Flower's `FedAdagrad`:

    Delta_t = sum_k p_k W_t^k - W_t
    m_t     = beta_1 m_{t-1} + (1 - beta_1) Delta_t
    v_t     = v_{t-1} + Delta_t^2
    W_{t+1} = W_t + eta m_t / (sqrt(v_t) + tau)

Defaults as Flower: eta = 0.1, tau = 1e-9, beta_1 = 0.0 (Flower fixes it at 0, i.e. no
momentum; the paper allows beta_1 > 0, so it stays a hyper-parameter here).
"""
from __future__ import annotations

from torch import Tensor

from ._fedopt import FedOpt


class FedAdagrad(FedOpt):
    name = "fedadagrad"

    def __init__(self, *, eta: float = 1e-1, beta_1: float = 0.0, tau: float = 1e-9) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=0.0, tau=tau)  # beta_2: unused by Adagrad

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return v + delta_sq
