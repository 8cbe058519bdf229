"""FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2) with Adam's
bias correction (Kingma & Ba, 2015, the alpha_t line before their section 2.1):

    Delta_t = sum_k p_k W_t^k - W_t
    m_t     = beta_1 m_{t-1} + (1 - beta_1) Delta_t
    v_t     = beta_2 v_{t-1} + (1 - beta_2) Delta_t^2
    eta_t   = eta * sqrt(1 - beta_2^t) / (1 - beta_1^t),   t = 1, 2, ... (rounds aggregated)
    W_{t+1} = W_t + eta_t m_t / (sqrt(v_t) + tau)

Defaults as Flower's `FedAdam`: eta = 0.1, beta_1 = 0.9, beta_2 = 0.99, tau = 1e-9.
(Flower's bias correction uses exponent `server_round + 1`, i.e. t + 1 for its 1-based
rounds; we use Kingma & Ba's t, so the first step is eta * sign(Delta_1) element-wise.)
"""
from __future__ import annotations

import math

from torch import Tensor

from ._fedopt import FedOpt


class FedAdam(FedOpt):
    name = "fedadam"

    def __init__(self, *, eta: float = 1e-1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-9) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return self.beta_2 * v + (1.0 - self.beta_2) * delta_sq

    def step_size(self, t: int) -> float:
        return self.eta * math.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)
