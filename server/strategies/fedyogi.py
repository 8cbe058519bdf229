"""FedYogi (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2; Yogi:
Zaheer et al., 2018), as Flower's `FedYogi`:

    Delta_t = sum_k p_k W_t^k - W_t
    m_t     = beta_1 m_{t-1} + (1 - beta_1) Delta_t
    v_t     = v_{t-1} - (1 - beta_2) Delta_t^2 sign(v_{t-1} - Delta_t^2)
    W_{t+1} = W_t + eta m_t / (sqrt(v_t) + tau)

No bias correction. Defaults as Flower: eta = 0.01, beta_1 = 0.9, beta_2 = 0.99, tau = 1e-3.
"""
from __future__ import annotations

from torch import Tensor

from ._fedopt import FedOpt


class FedYogi(FedOpt):
    name = "fedyogi"

    def __init__(self, *, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return v - (1.0 - self.beta_2) * delta_sq * (v - delta_sq).sign()
