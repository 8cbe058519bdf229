"""The strategy interface and the helpers every aggregation rule shares.

A strategy turns the global projector W_t and the projectors the clients trained this round
into W_{t+1}. The coordinator and the simulator call it the same way:

    new_params = strategy.aggregate(global_params, updates)

Contract (docs/algorithm.md, "Contract every strategy keeps" and "Durability contract"):
- `updates` may be a lazy sequence that loads one update from disk per `__getitem__`; a
  strategy indexes it once per pass, keeps at most one client's parameters alive and never
  stacks the K client tensors. The first pass validates every update and, when `updates`
  is already sorted by client_id (the server's is), is also the first accumulation pass.
- Clients are processed in `client_id` order, so the result does not depend on the order
  in which uploads arrived (bit for bit).
- p_k = n_k / sum_j n_j, n_k = `num_samples`.
- Inputs are float32, never mutated; outputs are fresh float32 CPU tensors with the keys
  and shapes of `global_params`.
- `state_dict()` holds tensors only (scalars as 0-d int64), so it round-trips through
  safetensors; `load_state_dict` on a fresh instance with the same hyper-parameters
  continues bit-identically.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

ROUND_KEY = "round"  # state key of the round counter (0-d int64), shared by stateful strategies


@dataclass
class ClientUpdate:
    client_id: str
    num_samples: int
    params: dict[str, Tensor]  # the client's local projector after training
    metrics: dict[str, float]


@runtime_checkable
class Strategy(Protocol):
    name: str

    def aggregate(
        self, global_params: dict[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


@dataclass(frozen=True)
class Participant:
    """One client of the round: where it sits in `updates`, its sample count and p_k."""

    index: int
    client_id: str
    num_samples: int
    weight: float


class Pass(Protocol):
    """One streaming pass over the round's clients, fed one update at a time in client_id order.

    `position` is the client's rank in client_id order; `count` is its num_samples. Passes
    weight by counts and divide by their sum at the end, so they need no total up front.
    """

    def add(self, position: int, update: ClientUpdate, count: float) -> None: ...


P = TypeVar("P", bound=Pass)


def float32(tensor: Tensor) -> Tensor:
    """The tensor as float32 on CPU (no copy when it already is)."""
    return tensor.detach().to(device="cpu", dtype=torch.float32)


def first_pass(
    global_params: Mapping[str, Tensor], updates: Sequence[ClientUpdate], new_pass: Callable[[], P]
) -> tuple[list[Participant], P]:
    """Validate every update and run a pass over them in client_id order; return (clients, pass).

    One read per update when `updates` is already sorted by client_id (the server's spilled
    sequence is); otherwise the reads so far are dropped, a metadata pass sorts the clients
    and a fresh pass runs in that order.
    """
    if not global_params:
        raise ValueError("global_params is empty")
    acc = new_pass()
    seen: list[tuple[str, int, int]] = []  # (client_id, index, num_samples), ascending ids
    for index in range(len(updates)):
        update = updates[index]
        _check_update(update, global_params)
        in_order = not seen or update.client_id > seen[-1][0]
        if in_order:
            seen.append((update.client_id, index, update.num_samples))
            acc.add(len(seen) - 1, update, float(update.num_samples))
        del update  # at most one client's parameters alive at a time
        if not in_order:
            break
    else:
        return _weigh(seen), acc
    order = _participants(global_params, updates)
    acc = new_pass()
    replay(updates, order, acc)
    return order, acc


def replay(updates: Sequence[ClientUpdate], order: Sequence[Participant], acc: Pass) -> None:
    """A further pass over the clients, in the order `first_pass` returned."""
    for position, part in enumerate(order):
        update = updates[part.index]
        acc.add(position, update, float(part.num_samples))
        del update


def _participants(global_params: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> list[Participant]:
    """Metadata pass: validate every update, return the clients sorted by client_id with p_k."""
    seen: list[tuple[str, int, int]] = []  # (client_id, index, num_samples)
    for index in range(len(updates)):
        update = updates[index]
        _check_update(update, global_params)
        seen.append((update.client_id, index, update.num_samples))
        del update
    return _weigh(sorted(seen))


def _weigh(seen: list[tuple[str, int, int]]) -> list[Participant]:
    """(client_id, index, num_samples) sorted by client_id -> Participants with p_k."""
    if not seen:
        raise ValueError("no client updates to aggregate")
    counts = Counter(client_id for client_id, _, _ in seen)
    duplicates = sorted(client_id for client_id, count in counts.items() if count > 1)
    if duplicates:
        raise ValueError(f"duplicate client ids in one round: {duplicates}")
    total = sum(num_samples for _, _, num_samples in seen)
    if total <= 0:
        raise ValueError("every update reports num_samples = 0; sample weights are undefined")
    return [Participant(index, client_id, n, n / total) for client_id, index, n in seen]


def _check_update(update: ClientUpdate, global_params: Mapping[str, Tensor]) -> None:
    who = f"update of client {update.client_id!r}"
    if isinstance(update.num_samples, bool) or not isinstance(update.num_samples, int) or update.num_samples < 0:
        raise ValueError(f"{who}: num_samples must be an int >= 0, got {update.num_samples!r}")
    if update.params.keys() != global_params.keys():
        missing = sorted(global_params.keys() - update.params.keys())
        extra = sorted(update.params.keys() - global_params.keys())
        raise ValueError(f"{who}: parameter keys differ from the global projector (missing {missing}, extra {extra})")
    for key, tensor in update.params.items():
        if tensor.shape != global_params[key].shape:
            raise ValueError(
                f"{who}: {key} has shape {tuple(tensor.shape)}, the global projector {tuple(global_params[key].shape)}"
            )


def total_samples(order: Sequence[Participant]) -> float:
    return float(sum(part.num_samples for part in order))


class _DeltaSum:
    """Pass accumulating sum_k n_k (W^k - W) per key, float32."""

    def __init__(self, base: Mapping[str, Tensor]) -> None:
        self.base = base
        self.total = {key: torch.zeros_like(tensor) for key, tensor in base.items()}
        self.delta = {key: torch.empty_like(tensor) for key, tensor in base.items()}  # D_k, reused

    def add(self, position: int, update: ClientUpdate, count: float) -> None:
        for key, acc in self.total.items():
            torch.sub(float32(update.params[key]), self.base[key], out=self.delta[key])  # D_k
            acc.add_(self.delta[key], alpha=count)


def mean_delta(
    global_params: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
) -> tuple[list[Participant], dict[str, Tensor]]:
    """(clients, Dbar) with Dbar = sum_k p_k (W^k - W) per key, in one pass over sorted `updates`."""
    base = {key: float32(tensor) for key, tensor in global_params.items()}
    order, acc = first_pass(global_params, updates, lambda: _DeltaSum(base))
    total = total_samples(order)
    return order, {key: tensor.div_(total) for key, tensor in acc.total.items()}


# --- hyper-parameters --------------------------------------------------------------------


def real_hyper(key: str, value: object, rule: str, ok: Callable[[float], bool]) -> float:
    """`value` as a float, or ValueError naming `key` when it is not a number satisfying `rule`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not ok(float(value)):
        raise ValueError(f"hyper-parameter {key}={value!r} is invalid: must be {rule}")
    return float(value)


def int_hyper(key: str, value: object, rule: str, ok: Callable[[int], bool]) -> int:
    """`value` as an int (an integral float such as 64.0 from a recipe is accepted)."""
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or not ok(int(value)):  # type: ignore[arg-type]
        raise ValueError(f"hyper-parameter {key}={value!r} is invalid: must be an integer {rule}")
    return int(value)  # type: ignore[arg-type]


def positive(value: float) -> bool:
    return 0.0 < value < math.inf


def unit_interval(value: float) -> bool:
    """0 <= value < 1: a decay factor."""
    return 0.0 <= value < 1.0


# --- state -------------------------------------------------------------------------------


def round_tensor(value: int) -> Tensor:
    return torch.tensor(value, dtype=torch.int64)


def join_state(round_index: int, groups: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Inverse of `split_state`: `{ROUND_KEY: round, "<prefix>/<name>": tensor, ...}`."""
    state = {ROUND_KEY: round_tensor(round_index)}
    for prefix, tensors in groups.items():
        state |= {f"{prefix}/{name}": tensor for name, tensor in tensors.items()}
    return state


def split_state(
    state: Mapping[str, Tensor], prefixes: Sequence[str], strategy: str
) -> tuple[int, dict[str, dict[str, Tensor]]]:
    """Parse `{ROUND_KEY, "<prefix>/<name>", ...}` into (round, {prefix: {name: float32 copy}})."""
    if ROUND_KEY not in state:
        raise ValueError(f"{strategy} state has no {ROUND_KEY!r} entry")
    groups: dict[str, dict[str, Tensor]] = {prefix: {} for prefix in prefixes}
    for key, tensor in state.items():
        if key == ROUND_KEY:
            continue
        prefix, _, name = key.partition("/")
        if prefix not in groups or not name:
            expected = f"{ROUND_KEY!r} or {list(prefixes)}/<name>"
            raise ValueError(f"{strategy} state has an unknown entry {key!r}; expected {expected}")
        groups[prefix][name] = float32(tensor).clone()
    return int(state[ROUND_KEY].item()), groups
