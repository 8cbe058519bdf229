"""FedAvg (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): the sample-weighted mean of the client projectors.

    W_{t+1} = W_t + sum_k p_k (W_t^k - W_t),   p_k = n_k / sum_j n_j

which equals sum_k p_k W_t^k; averaging the deltas D_k = W_t^k - W_t keeps more float32
digits when the round moves the weights little. Computed as (sum_k n_k D_k) / sum_k n_k in
one pass over the clients in client_id order (two with a `norm_bound`). Stateless; its only
hyper-parameter is the norm bound every strategy has (default inf: off).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .base import ClientUpdate, NormBounded, float32, mean_delta


class FedAvg(NormBounded):
    name = "fedavg"

    def client_weight(self, update: ClientUpdate) -> float:
        """v_k, the unnormalised weight of a client: its sample count."""
        return float(update.num_samples)

    def aggregate(self, global_params: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        _, delta = mean_delta(global_params, updates, self.norm_bound, self.client_weight)
        return {key: d.add_(float32(global_params[key])) for key, d in delta.items()}

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} is stateless; got state entries {sorted(state)}")
