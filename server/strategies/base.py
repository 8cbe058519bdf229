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
- Client weights are each strategy's own: sample shares n_k / sum_j n_j for FedAvg and the
  baselines built on it, equal weights for `fedavg-equal`, n_k / tau_k for FedNova,
  n_k^alpha for Fed-CMP (n_k = `num_samples`, tau_k = the client's reported `steps`).
- Norm bound (every strategy, recipe key `norm_bound`, off = inf unless the strategy says
  otherwise): each client's delta D_k = W^k - W is scaled by
  min(1, norm_bound * median_j ||D_j|| / ||D_k||) before any accumulation (`bounded`).
- Inputs are float32, never mutated; outputs are fresh float32 CPU tensors with the keys
  and shapes of `global_params`.
- `state_dict()` holds tensors only (scalars as 0-d int64), so it round-trips through
  safetensors; `load_state_dict` on a fresh instance with the same hyper-parameters
  continues bit-identically.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

ROUND_KEY = "round"  # state key of the round counter (0-d int64), shared by stateful strategies
NORM_BOUND_KEY = "norm_bound"  # the hyper-parameter every strategy accepts (see `bounded`)
BLOCK_ELEMENTS = 1 << 20  # 4 MiB of float32: what a blockwise pass holds besides its outputs


@dataclass
class ClientUpdate:
    client_id: str
    num_samples: int
    params: dict[str, Tensor]  # the client's local projector after training
    metrics: dict[str, float]  # the client's report; its trainer sends `steps` and `samples`


@runtime_checkable
class Strategy(Protocol):
    name: str

    def aggregate(
        self, global_params: dict[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


class NormBounded:
    """Base of every registered strategy: the norm bound (`norm_bound`), set by `build_strategy`.

    A class sets its default by overriding `norm_bound` (inf: no bound).
    """

    norm_bound: float = math.inf


@dataclass(frozen=True)
class Participant:
    """One client of the round: where it sits in `updates`, and how the passes scale its delta."""

    index: int
    client_id: str
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    norm: float = math.nan  # ||W^k - W||_F over every parameter; NaN until `survey`
    scale: float = 1.0  # s_k: the passes see s_k (W^k - W)
    wide: bool = False  # W^k - W overflows float32: the passes form it in float64

    def delta(self, new: Tensor, base: Tensor, out: Tensor) -> Tensor:
        """s_k (new - base) into `out` (float32, shaped like `base`); finite for any finite input."""
        if self.wide:
            return out.copy_(float32(new).double().sub_(base.double()).mul_(self.scale))
        torch.sub(float32(new), base, out=out)
        return out if self.scale == 1.0 else out.mul_(self.scale)


class Pass(Protocol):
    """One streaming pass over the round's clients, fed one update at a time in client_id order.

    `position` is the client's rank in client_id order; `part` says how to form its delta
    (`part.delta`). Passes weight as their strategy does and normalise at the end, so they
    need no total up front.
    """

    def add(self, position: int, update: ClientUpdate, part: Participant) -> None: ...


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
    and a fresh pass runs in that order. Deltas are not scaled (no norm bound).
    """
    if not global_params:
        raise ValueError("global_params is empty")
    acc = new_pass()
    seen: list[Participant] = []  # ascending client ids
    for index in range(len(updates)):
        update = updates[index]
        _check_update(update, global_params)
        in_order = not seen or update.client_id > seen[-1].client_id
        if in_order:
            seen.append(Participant(index, update.client_id, update.num_samples, dict(update.metrics)))
            acc.add(len(seen) - 1, update, seen[-1])
        del update  # at most one client's parameters alive at a time
        if not in_order:
            break
    else:
        return _checked_round(seen), acc
    order = _participants(global_params, updates, with_norms=False)
    acc = new_pass()
    replay(updates, order, acc)
    return order, acc


def replay(updates: Sequence[ClientUpdate], order: Sequence[Participant], acc: Pass) -> None:
    """A further pass over the clients, in the order `first_pass` or `survey` returned."""
    for position, part in enumerate(order):
        update = updates[part.index]
        acc.add(position, update, part)
        del update


def survey(global_params: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> list[Participant]:
    """Metadata pass: validate every update and measure ||D_k|| (float64); clients sorted by client_id.

    A non-finite entry is a ValueError naming the client. A delta that overflows float32 (an
    entry near the float32 limit against a global of the opposite sign) is measured in float64
    and marked `wide`, so the passes form it in float64 too.
    """
    if not global_params:
        raise ValueError("global_params is empty")
    return _participants(global_params, updates, with_norms=True)


def bounded(order: Sequence[Participant], norm_bound: float) -> list[Participant]:
    """Scale every delta longer than norm_bound * (median of the clients' ||D_k||) down to that length.

    The median is over the clients that moved: trained on something (num_samples > 0) and sent
    a delta other than zero. A zero delta says nothing about how far an honest client moves (a
    client whose round is one step at a warm-up rate of 0 sends one), and counting it would
    shrink the bound for everyone else. norm_bound = inf leaves every delta as it is, and so
    does a round in which no client moved. Needs the norms of `survey`.
    """
    moved = [part.norm for part in order if part.num_samples > 0 and part.norm > 0.0]
    if math.isinf(norm_bound) or not moved:
        return list(order)
    limit = norm_bound * statistics.median(moved)
    return [
        dataclasses.replace(part, scale=part.scale * limit / part.norm) if part.norm > limit else part
        for part in order
    ]


def normalised(order: Sequence[Participant]) -> tuple[list[Participant], float]:
    """(clients with s_k divided by c, c): every scaled delta then has norm <= 1, c = max_k s_k ||D_k||.

    For strategies whose accumulations are quadratic in D_k (Gram matrices, sketches): on
    deltas of norm <= 1 they cannot overflow float32 whatever the input; the result is scaled
    back by c. c = 1 when no client moved.
    """
    largest = max(part.scale * part.norm for part in order)
    unit = largest if largest > 0.0 else 1.0
    return [dataclasses.replace(part, scale=part.scale / unit) for part in order], unit


def _participants(
    global_params: Mapping[str, Tensor], updates: Sequence[ClientUpdate], with_norms: bool
) -> list[Participant]:
    """Validate every update; return the clients sorted by client_id (with ||D_k|| if asked)."""
    seen: list[Participant] = []
    base = {key: float32(tensor) for key, tensor in global_params.items()} if with_norms else {}
    # One buffer for every client's deltas, as large as the largest tensor: a fresh tensor per
    # client and key would have its pages faulted in anew each time (docs/decisions.md).
    scratch = torch.empty(max((tensor.numel() for tensor in base.values()), default=0))
    for index in range(len(updates)):
        update = updates[index]
        _check_update(update, global_params)
        part = Participant(index, update.client_id, update.num_samples, dict(update.metrics))
        seen.append(_measured(part, update, base, scratch) if with_norms else part)
        del update
    return _checked_round(sorted(seen, key=lambda part: part.client_id))


def sum_of_squares(tensor: Tensor) -> float:
    """||tensor||_F^2 as a float64 number: row norms in float32, their squares summed in float64.

    At the 7B projector this is about 20x faster than one float64 accumulation and as accurate
    (one float32 accumulation over 16M entries was off by 6.5e-4); rows whose float32 sums of
    squares overflow (entries beyond ~1e19) are measured again in float64. inf only when the
    tensor holds inf.
    """
    rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(1, -1)  # [m, n]
    norms = torch.linalg.vector_norm(rows, dim=1).double()  # [m]
    if not bool(torch.isfinite(norms).all()):
        norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)
    return float(norms.square().sum())


def _measured(part: Participant, update: ClientUpdate, base: Mapping[str, Tensor], scratch: Tensor) -> Participant:
    """`part` with norm = ||W^k - W||_F (and `wide` if float32 cannot hold W^k - W); each
    W^k - W is formed in `scratch` (float32, at least as many elements as the largest tensor)."""
    squares = sum(sum_of_squares(torch.sub(float32(update.params[key]), tensor,
                                           out=scratch[:tensor.numel()].view(tensor.shape)))
                  for key, tensor in base.items())
    if math.isfinite(squares):
        return dataclasses.replace(part, norm=math.sqrt(squares))
    exact = sum(float(torch.linalg.vector_norm(float32(update.params[key]).double() - tensor.double())) ** 2
                for key, tensor in base.items())
    if not math.isfinite(exact):
        raise ValueError(f"update of client {part.client_id!r} holds non-finite values")
    return dataclasses.replace(part, norm=math.sqrt(exact), wide=True)


def _checked_round(seen: list[Participant]) -> list[Participant]:
    """The round's clients, sorted by client_id: refuse an empty round, duplicates, no samples at all."""
    if not seen:
        raise ValueError("no client updates to aggregate")
    counts = Counter(part.client_id for part in seen)
    duplicates = sorted(client_id for client_id, count in counts.items() if count > 1)
    if duplicates:
        raise ValueError(f"duplicate client ids in one round: {duplicates}")
    if sum(part.num_samples for part in seen) <= 0:
        raise ValueError("every update reports num_samples = 0; sample weights are undefined")
    return seen


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


# --- the weighted mean of the deltas (FedAvg and the strategies built on it) ---------------

Weigh = Callable[[ClientUpdate], float]  # v_k, the unnormalised weight of a client


def sample_weight(update: ClientUpdate) -> float:
    """v_k = n_k: FedAvg's sample shares."""
    return float(update.num_samples)


def blocks(tensor: Tensor) -> tuple[Tensor, ...]:
    """Consecutive 1-D views of a contiguous `tensor`, BLOCK_ELEMENTS each (the last may be shorter)."""
    return tensor.view(-1).split(BLOCK_ELEMENTS)


class _DeltaSum:
    """Pass accumulating sum_k v_k s_k D_k per key (float32) and sum_k v_k.

    Each delta is formed block by block into one scratch block, so the pass holds the sum and
    a block, not a second projector.
    """

    def __init__(self, base: Mapping[str, Tensor], weigh: Weigh) -> None:
        self.base, self.weigh = base, weigh
        self.weight = 0.0
        self.total = {key: torch.zeros_like(tensor) for key, tensor in base.items()}
        self.scratch = torch.empty(min(BLOCK_ELEMENTS, max(t.numel() for t in base.values())))  # s_k D_k, a block

    def add(self, position: int, update: ClientUpdate, part: Participant) -> None:
        weight = self.weigh(update)
        self.weight += weight
        for key, acc in self.total.items():
            new = float32(update.params[key]).contiguous()
            for acc_block, new_block, base_block in zip(blocks(acc), blocks(new), blocks(self.base[key])):
                acc_block.add_(part.delta(new_block, base_block, out=self.scratch[:len(acc_block)]), alpha=weight)


def mean_delta(
    global_params: Mapping[str, Tensor],
    updates: Sequence[ClientUpdate],
    norm_bound: float = math.inf,
    weigh: Weigh = sample_weight,
) -> tuple[list[Participant], dict[str, Tensor]]:
    """(clients, Dbar) with Dbar = sum_k v_k s_k D_k / sum_k v_k per key, in client_id order.

    One pass over sorted `updates` without a norm bound; with one, a `survey` pass first.
    """
    base = {key: float32(tensor).contiguous() for key, tensor in global_params.items()}
    if math.isinf(norm_bound):
        order, acc = first_pass(global_params, updates, lambda: _DeltaSum(base, weigh))
    else:
        order = bounded(survey(global_params, updates), norm_bound)
        acc = _DeltaSum(base, weigh)
        replay(updates, order, acc)
    if acc.weight <= 0.0:
        raise ValueError("every client weighs 0 this round; the mean is undefined")
    return order, {key: tensor.div_(acc.weight) for key, tensor in acc.total.items()}


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
