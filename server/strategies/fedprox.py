"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks"): FedAvg on the
server, a proximal term on the clients.

The server side is FedAvg, W_{t+1} = W_t + sum_k p_k (W_t^k - W_t). The proximal term
mu/2 ||w - W_t||^2 is the client trainer's: it is added to every client's local loss when the
recipe's `proximal_mu` is > 0, whatever the strategy (the recipe's default is 0, so a `fedprox`
run without `proximal_mu` is FedAvg under another name).
"""
from __future__ import annotations

from .fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"
