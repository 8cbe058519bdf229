"""FedAvg with equal client weights: the plain mean of the client deltas.

    W_{t+1} = W_t + (1 / K') sum_k (W_t^k - W_t)      (K' = clients with num_samples > 0)

A client that trained on nothing weighs nothing. With one-pass local training each update
already carries the client's tau_k local steps, so this is FedNova's normalisation without
its step-size factor tau_eff (docs/algorithm.md); it is the baseline that separates what
Fed-CMP's equal client weights (alpha = 0) buy from what its fusion buys.
"""
from __future__ import annotations

from .base import ClientUpdate
from .fedavg import FedAvg


class FedAvgEqual(FedAvg):
    name = "fedavg-equal"

    def client_weight(self, update: ClientUpdate) -> float:
        return 1.0 if update.num_samples > 0 else 0.0
