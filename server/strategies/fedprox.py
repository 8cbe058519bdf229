"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks").

The proximal term mu/2 ||w - w_t||^2 is added to each client's local loss; the recipe
carries `proximal_mu` and the client trainer applies it. The server side is FedAvg:

    W_{t+1} = W_t + sum_k p_k (W_t^k - W_t)

so this strategy only differs from `fedavg` by its name (which tells clients to use the term).
"""
from __future__ import annotations

from .fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"
