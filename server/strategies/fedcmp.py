"""Fed-CMP: Canonical Reliability-Aware Aggregation (CRA) + Orthogonality-Preserved Momentum
(OPM), this project's formulation (docs/algorithm.md, which also says where it departs from the
design's specification) of "A Step Toward Federated Pretraining of Multimodal Large Language
Models" (arXiv 2603.26786).

Per layer L = [W | b] in R^{m x n} (bias appended as a column), clients k = 1..K,
p_k = n_k^alpha / sum_j n_j^alpha (alpha = 1: sample shares; alpha = 0: every client alike,
step-normalised), D_k = s_k (W_t^k - W_t) with the norm bound
s_k = min(1, norm_bound * median_j ||W_t^j - W_t|| / ||W_t^k - W_t||) (base.bounded):

    U_t     = top-r eigenvectors of G = sum_k p_k D_k D_k^T                        [m, r]
              r = smallest rank holding a fraction tau of trace(G), r <= r_max
              (tau = 1 keeps every direction the range holds)
    C_k     = U_t^T D_k                                                             [r, n]
    cbar    = sum_k p_k C_k / ||C_k||_F                      (consensus of the unit coefficient matrices)
    a_k     = <C_k, cbar>_F / (||C_k||_F ||cbar||_F)         (0 for a zero C_k)
    e_k     = max(0, -a_k - kappa sigma)                     (sigma = 1.4826 MAD of a over the clients
              that moved: moving against the consensus beyond the honest spread)
    f_k     = ||C_k||_F^2 / ||D_k||_F^2                      (1 when D_k = 0)
    w_ki    = w_k = p_k f_k^gamma exp(-e_k / T) / sum_j p_j f_j^gamma exp(-e_j / T)   (one vote per client)
    Chat[i] = (1 + rho) (H_i + rho I)^{-1} sum_k w_ki C_k[i],  H_i = sum_k w_ki u_ki u_ki^T  [n, n]
              (u_ki = C_k[i] / ||C_k[i]||: a direction every client moves along identically gets
              that move, rows of different clients that are orthogonal add up instead of being
              diluted by the clients that do not move along them; rho = inf: sum_k w_ki C_k[i])
    Dhat_t  = U_t Chat + lam sum_k p_k E_k = U_t (Chat - lam Cbar) + lam Dbar
              (E_k = D_k - U_t C_k, Cbar = sum_k p_k C_k, Dbar = sum_k p_k D_k)
    M_t     = beta U_t U_t^T M_{t-1} + Dhat_t
    W_{t+1} = W_t + eta_s M_t

alpha = 1, tau = 1, T = inf, gamma = 0, rho = inf, beta = 0, norm_bound = inf gives w = p and
Dhat = Dbar: FedAvg.

Computing U_t without the m x Kn matrix [sqrt(p_1) D_1, ...]: streaming passes over the
clients in client_id order, one client in memory at a time (sums weighted by n_k^alpha,
divided by sum_k n_k^alpha at the end). A survey pass first measures ||W_t^k - W_t|| (float64)
for the norm bound; every later pass works on D_k / c, c = max_k ||D_k||, so no Gram or sketch
entry can overflow float32 whatever the input, and Dhat_t is scaled back by c. Then one sketch
pass when a layer is tall, and one projection pass.
- Range. A layer with m <= 2s (s = r_max + oversample) uses the whole space, Q = I_m.
  A taller layer gets a randomized range sketch (Halko, Martinsson & Tropp, 2011):
  Y = G Omega = sum_k p_k D_k (D_k^T Omega), Omega ~ N(0, 1)^{m x s} seeded by (seed, round),
  Q = qr(Y) [m, s]. Cost per client 4mns flops against 2m^2 n for the exact Gram, so the
  sketch is used exactly where it is cheaper.
- Rayleigh-Ritz. Z_k = Q^T D_k [s, n] (kept for all k: O(K s n)), B = sum_k p_k Z_k Z_k^T,
  B = V diag(lambda) V^T, U = Q V_r, C_k = V_r^T Z_k. The energy fraction compares the
  Ritz values lambda with the exact trace(G) = sum_k p_k ||D_k||_F^2.
Every sum runs in client_id order, so the result is bit-identical for any upload order.

State: `round`, `momentum/<layer>` (M_t, [m, n]; only when beta > 0) and `basis/<layer>`
(U_t, [m, r]; the last basis, for inspection and tests). <layer> is the weight's key.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import (
    NORM_BOUND_KEY,
    ClientUpdate,
    NormBounded,
    Participant,
    bounded,
    float32,
    int_hyper,
    join_state,
    normalised,
    positive,
    real_hyper,
    replay,
    split_state,
    survey,
    unit_interval,
)


def client_weight(num_samples: float, alpha: float) -> float:
    """n_k^alpha, the unnormalised p_k; 0 for a client that trained on nothing (also at alpha = 0)."""
    return num_samples**alpha if num_samples > 0 else 0.0


@dataclass(frozen=True)
class Layer:
    """Parameters fused into one matrix: a weight [m, n] and its bias [m] as column n + 1.

    A tensor without a partner is a layer of its own, viewed as [shape[0], -1] (a 1-D
    tensor as m x 1, a 0-d one as 1 x 1). The layer is named by its first key.
    """

    keys: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def name(self) -> str:
        return self.keys[0]

    @property
    def rows(self) -> int:
        return self.shapes[0][0] if self.shapes[0] else 1

    @property
    def widths(self) -> list[int]:
        return [math.prod(shape) // self.rows for shape in self.shapes]

    def matrix(self, params: Mapping[str, Tensor]) -> Tensor:
        """[W | b] as float32 [m, n]."""
        return torch.cat([float32(params[key]).reshape(self.rows, -1) for key in self.keys], dim=1)

    def delta(self, params: Mapping[str, Tensor], base: Tensor, out: Tensor, part: Participant) -> Tensor:
        """s_k (matrix(params) - base) written into `out` [m, n], block by block (no concatenated copy)."""
        start = 0
        for key, width in zip(self.keys, self.widths):
            block = slice(start, start + width)
            part.delta(params[key].reshape(self.rows, -1), base[:, block], out=out[:, block])
            start += width
        return out

    def step(self, base: Tensor, direction: Tensor, alpha: float) -> dict[str, Tensor]:
        """base + alpha * direction ([m, n] each) as fresh tensors keyed and shaped like the parameters."""
        bases, directions = torch.split(base, self.widths, dim=1), torch.split(direction, self.widths, dim=1)
        return {
            key: torch.add(b, d, alpha=alpha).reshape(shape).contiguous()  # no copy: the sum of column slices is dense
            for key, b, d, shape in zip(self.keys, bases, directions, self.shapes)
        }


def group_layers(params: Mapping[str, Tensor]) -> list[Layer]:
    """Pair every 2-D `<x>.weight` [m, n] with a 1-D `<x>.bias` [m]; every other tensor stands alone."""
    bias_of: dict[str, str] = {}
    for key, tensor in params.items():
        bias = key.removesuffix("weight") + "bias"
        if key.endswith(".weight") and tensor.dim() == 2 and bias in params and params[bias].shape == tensor.shape[:1]:
            bias_of[key] = bias
    claimed = set(bias_of.values())
    return [
        Layer((key, bias_of[key]), (params[key].shape, params[bias_of[key]].shape))
        if key in bias_of
        else Layer((key,), (params[key].shape,))
        for key in sorted(params)
        if key not in claimed
    ]


def _onednn_linear() -> Callable[[Tensor, Tensor], Tensor] | None:
    """oneDNN's float32 GEMM behind `torch.ops.mkldnn`, or None on a PyTorch build without it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        linear = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    return lambda a, b: linear(a, b, None, "none", [], "")


_ONEDNN_LINEAR = _onednn_linear()


def times_transposed(a: Tensor, b: Tensor) -> Tensor:
    """a @ b.T for float32 CPU matrices a [p, q], b [t, q] (either may be a transposed view) -> [p, t].

    The sketch's products are skinny (one side s = r_max + oversample wide); MKL's sgemm runs
    them ~20% slower than oneDNN's GEMM (docs/PERFORMANCE.md), so they go through oneDNN where
    PyTorch has it. Both are plain float32 GEMMs: the results agree to rounding.
    """
    if _ONEDNN_LINEAR is None:
        return a @ b.T
    return _ONEDNN_LINEAR(a, b)


def select_rank(ritz: Tensor, total: float, tau: float, r_max: int) -> int:
    """Smallest r whose top-r Ritz values (descending) hold tau * total; all of them when tau = 1."""
    if total <= 0.0 or len(ritz) == 0:
        return 0
    if tau >= 1.0:
        return min(len(ritz), r_max)
    energy = torch.cumsum(ritz.clamp_min(0.0).double(), dim=0)  # [s]
    reached = torch.nonzero(energy >= tau * total)
    rank = int(reached[0]) + 1 if len(reached) else len(ritz)
    return min(rank, r_max)


@dataclass(frozen=True)
class Rows:
    """The clients' coefficient rows C_k[i], with their lengths and directions."""

    coef: Tensor  # C [K, r, n]
    norms: Tensor  # ||C_k[i]||, [K, r]
    unit: Tensor  # u_ki = C_k[i] / ||C_k[i]||, [K, r, n]; a zero row stays zero

    @classmethod
    def of(cls, coef: Tensor) -> Rows:
        norms = torch.linalg.vector_norm(coef, dim=2)  # [K, r]
        return cls(coef, norms, coef / torch.where(norms > 0, norms, 1.0)[..., None])


MAD_TO_SIGMA = 1.4826  # sigma = 1.4826 MAD for normally distributed values


def significant_disagreement(agreement: Tensor, moved: Tensor, kappa: float) -> Tensor:
    """e_k = max(0, -a_k - kappa sigma): how far a client moves against the consensus beyond the honest spread.

    Only a client pointing against the consensus (a < 0) by more than kappa sigma counts.
    sigma = 1.4826 MAD, the scaled median absolute deviation of a from its (lower) median over
    the clients that moved. agreement: a [K]; moved: [K] bool. A client that did not move gets
    e = 0. Returns e [K].
    """
    scores = torch.where(moved, agreement, math.nan)  # [K]
    median = scores.nanmedian()  # NaN when no client moved
    sigma = MAD_TO_SIGMA * (scores - median).abs().nanmedian()
    excess = (-agreement - kappa * sigma).clamp_min(0.0)  # [K]
    return torch.where(moved, excess, 0.0)


def reliability_weights(rows: Rows, p: Tensor, fidelity: Tensor, temperature: float, gamma: float,
                        kappa: float) -> Tensor:
    """w_ki = w_k = p_k f_k^gamma exp(-e_k / T), normalised over clients k (e: significant_disagreement).

    One vote per client, on its whole coefficient matrix: a_k = cos(C_k, cbar), cbar = sum_k p_k
    C_k / ||C_k||_F. An honest client of another domain opposes the consensus on some rows but
    shares the common drift, so its whole C_k agrees (a_k > 0); a client sending the negative of
    the honest move has a_k near -1. rows: the rows of C [K, r, n]; p: [K]; fidelity: f [K].
    Returns w [K, r] (the same for every row of a client).
    """
    coef = rows.coef.flatten(1)  # C_k flattened, [K, r n]
    norms = torch.linalg.vector_norm(coef, dim=1)  # ||C_k||_F, [K]
    unit = coef / torch.where(norms > 0, norms, 1.0)[:, None]  # [K, r n]; a zero C_k stays zero
    consensus = p @ unit  # cbar [r n]
    consensus_norm = torch.linalg.vector_norm(consensus)
    agreement = unit @ consensus / torch.where(consensus_norm > 0, consensus_norm, 1.0)  # a [K]
    moved = (norms > 0) & (p > 0)  # [K]
    excess = significant_disagreement(agreement.clamp(-1.0, 1.0), moved, kappa)  # e [K]
    weights = p * fidelity.pow(gamma) * torch.exp(-excess / temperature)  # [K]; T = inf: p f^gamma
    total = weights.sum()
    weights = torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), p)  # [K]
    return weights[:, None].expand(-1, rows.coef.shape[1])  # [K, r]


def overlap_fusion(rows: Rows, weights: Tensor, rho: float) -> Tensor:
    """Chat[i] = (1 + rho) (H_i + rho I)^{-1} mu_i with H_i = sum_k w_ki u_ki u_ki^T, mu_i = sum_k w_ki C_k[i].

    Each client asks the fused row to move as far along its own unit row u_ki as it moved itself
    (||C_k[i]||); rho is a ridge. Solved in the span of the K rows, never as an n x n matrix:
    Chat[i] = (1 + rho) sum_k y_ik u_ki with (diag(w_i) Gram_i + rho I) y_i = w_i * ||C_k[i]||
    (Gram_i[k, l] = <u_ki, u_li>; its eigenvalues are >= rho > 0, so the system is regular, and
    a zero row gets y_ik = 0). rho = inf is the weighted mean sum_k w_ki C_k[i].

    rows: the rows of C [K, r, n]; weights: w [K, r], summing to 1 over k. Returns Chat [r, n].
    """
    if math.isinf(rho):
        return torch.einsum("kr,krn->rn", weights, rows.coef)
    gram = torch.einsum("krn,lrn->rkl", rows.unit, rows.unit).double()  # [r, K, K]
    row_weights = weights.T.double()  # [r, K]
    system = row_weights[:, :, None] * gram + rho * torch.eye(len(weights), dtype=torch.float64)  # [r, K, K]
    target = (row_weights * rows.norms.T.double())[..., None]  # [r, K, 1]
    y = torch.linalg.solve(system, target)[..., 0].float()  # [r, K]
    return (1.0 + rho) * torch.einsum("rk,krn->rn", y, rows.unit)


FLOAT32_MAX = torch.finfo(torch.float32).max


def rescaled(tensor: Tensor, factor: float) -> Tensor:
    """tensor *= factor in place, also when factor itself exceeds float32 (applied as two square roots)."""
    if factor <= FLOAT32_MAX:
        return tensor.mul_(factor)
    root = math.sqrt(factor)
    return tensor.mul_(root).mul_(root)


class _Sketch:
    """Pass 1, layers with m > 2s: Y = sum_k n_k^alpha D_k (Omega^T D_k)^T [m, s]; Q = qr(Y)."""

    def __init__(
        self,
        layers: Sequence[Layer],
        base: Mapping[str, Tensor],  # W_t [m, n]
        delta: Mapping[str, Tensor],  # buffers for D_k [m, n]
        omega: Mapping[str, Tensor],  # Omega^T [s, m]
        alpha: float,
    ) -> None:
        self.layers, self.base, self.delta, self.omega_t, self.alpha = layers, base, delta, omega, alpha
        self.y = {name: torch.zeros(o.shape[1], o.shape[0]) for name, o in omega.items()}  # [m, s]

    def add(self, position: int, update: ClientUpdate, part: Participant) -> None:
        weight = client_weight(update.num_samples, self.alpha)
        for layer in self.layers:
            d = layer.delta(update.params, self.base[layer.name], self.delta[layer.name], part)  # s_k D_k [m, n]
            sketch = times_transposed(self.omega_t[layer.name], d.T)  # Omega^T D_k [s, n]
            self.y[layer.name].add_(times_transposed(d, sketch), alpha=weight)  # D_k D_k^T Omega [m, s]

    def ranges(self) -> dict[str, Tensor]:
        return {name: torch.linalg.qr(y).Q.T.contiguous() for name, y in self.y.items()}  # Q^T [s, m]


class _Projection:
    """Pass 2, every layer: Z_k = Q^T D_k (Q = I when not sketched), B = sum_k n_k^alpha Z_k Z_k^T,
    ||D_k||_F^2 and sum_k n_k^alpha D_k."""

    def __init__(
        self,
        layers: Sequence[Layer],
        base: Mapping[str, Tensor],  # W_t [m, n]
        delta: Mapping[str, Tensor],  # buffers for D_k [m, n]
        ranges: Mapping[str, Tensor],  # Q^T [s, m] of the sketched layers
        clients: int,
        alpha: float,
    ) -> None:
        self.layers, self.base, self.delta, self.ranges, self.alpha = layers, base, delta, ranges, alpha
        self.z: dict[str, Tensor] = {}  # [K, s, n]
        self.gram: dict[str, Tensor] = {}  # [s, s]
        self.sqnorm: dict[str, Tensor] = {}  # [K]
        self.mean: dict[str, Tensor] = {}  # [m, n]
        for layer in layers:
            m, n = base[layer.name].shape
            s = ranges[layer.name].shape[0] if layer.name in ranges else m
            self.z[layer.name] = torch.empty(clients, s, n)
            self.gram[layer.name] = torch.zeros(s, s)
            self.sqnorm[layer.name] = torch.empty(clients)
            self.mean[layer.name] = torch.zeros(m, n)

    def add(self, position: int, update: ClientUpdate, part: Participant) -> None:
        weight = client_weight(update.num_samples, self.alpha)
        for layer in self.layers:
            name = layer.name
            d = layer.delta(update.params, self.base[name], self.delta[name], part)  # s_k D_k [m, n]
            z = self.z[name][position]  # [s, n]
            if name in self.ranges:
                z.copy_(times_transposed(self.ranges[name], d.T))  # Q^T D_k
            else:
                z.copy_(d)
            self.gram[name].addmm_(z, z.T, alpha=weight)
            self.sqnorm[name][position] = torch.linalg.vector_norm(d).square()
            self.mean[name].add_(d, alpha=weight)


class FedCMP(NormBounded):
    name = "fedcmp"
    norm_bound = 1.5

    def __init__(
        self,
        *,
        alpha: float = 0.0,
        tau: float = 0.95,
        r_max: int = 64,
        temperature: float = 0.1,
        kappa: float = 2.0,
        gamma: float = 0.0,
        rho: float = 0.3,
        lam: float = 1.0,
        beta: float = 0.5,
        eta_s: float = 1.0,
        oversample: int = 8,
        seed: int = 0,
    ) -> None:
        self.alpha = real_hyper("alpha", alpha, "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        self.tau = real_hyper("tau", tau, "in (0, 1]", lambda v: 0.0 < v <= 1.0)
        self.r_max = int_hyper("r_max", r_max, ">= 1", lambda v: v >= 1)
        self.temperature = real_hyper("temperature", temperature, "> 0 (inf allowed)", lambda v: v > 0.0)
        self.kappa = real_hyper("kappa", kappa, "a finite number >= 0", lambda v: 0.0 <= v < math.inf)
        self.gamma = real_hyper("gamma", gamma, "a finite number >= 0", lambda v: 0.0 <= v < math.inf)
        self.rho = real_hyper("rho", rho, "> 0 (inf allowed)", lambda v: v > 0.0)
        self.lam = real_hyper("lam", lam, "a finite number >= 0", lambda v: 0.0 <= v < math.inf)
        self.beta = real_hyper("beta", beta, "in [0, 1)", unit_interval)
        self.eta_s = real_hyper("eta_s", eta_s, "> 0", positive)
        self.oversample = int_hyper("oversample", oversample, ">= 0", lambda v: v >= 0)
        self.seed = int_hyper("seed", seed, "in [0, 2^31)", lambda v: 0 <= v < 2**31)
        self._round = 0
        self._momentum: dict[str, Tensor] = {}  # M_{t-1} per layer, [m, n]
        self._basis: dict[str, Tensor] = {}  # U_{t-1} per layer, [m, r]

    @property
    def sketch_size(self) -> int:
        return self.r_max + self.oversample

    def aggregate(self, global_params: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> dict[str, Tensor]:
        layers = group_layers(global_params)
        base = {layer.name: layer.matrix(global_params) for layer in layers}  # W_t [m, n]
        delta = {name: torch.empty_like(w) for name, w in base.items()}  # D_k [m, n], reused by both passes
        t = self._round + 1
        s = self.sketch_size
        # Survey pass: ||D_k||; the norm bound and then 1 / unit scale every delta to norm <= 1
        order, unit = normalised(bounded(survey(global_params, updates), self.norm_bound))
        tall = [layer for layer in layers if layer.rows > 2 * s]
        ranges: dict[str, Tensor] = {}
        if tall:  # a sketch pass for the tall layers
            generator = torch.Generator().manual_seed(self.seed * 2**32 + t)
            omega = {layer.name: torch.randn(layer.rows, s, generator=generator).T.contiguous()
                     for layer in tall}  # Omega^T [s, m], Omega ~ N(0, 1)^{m x s}
            sketch = _Sketch(tall, base, delta, omega, self.alpha)
            replay(updates, order, sketch)
            ranges = sketch.ranges()
        proj = _Projection(layers, base, delta, ranges, len(order), self.alpha)  # the projection pass, every layer
        replay(updates, order, proj)
        counts = torch.tensor([client_weight(part.num_samples, self.alpha) for part in order], dtype=torch.float64)
        total_n = float(counts.sum())  # sum_k n_k^alpha, > 0: survey rejects a round without samples
        p = (counts / total_n).float()  # [K]

        new_params: dict[str, Tensor] = {}
        momentum: dict[str, Tensor] = {}
        basis: dict[str, Tensor] = {}
        for layer in layers:
            name = layer.name
            gram = proj.gram[name].double() / total_n  # B [s, s]; float64 is free at this size
            ritz, vectors = torch.linalg.eigh(gram)  # ascending
            ritz, vectors = ritz.flip(0), vectors.flip(1).float()
            energy = float((p.double() * proj.sqnorm[name].double()).sum())  # trace(G)
            v = vectors[:, : select_rank(ritz, energy, self.tau, self.r_max)]  # V_r [s, r]
            u = v.contiguous() if name not in ranges else ranges[name].T @ v  # U_t = Q V_r [m, r]
            coef = torch.matmul(v.T, proj.z[name])  # C [K, r, n]
            mean = proj.mean[name].div_(total_n)  # Dbar [m, n]
            step = rescaled(self._fuse(u, coef, p, proj.sqnorm[name], mean), unit)  # Dhat_t [m, n], back from units
            previous = self._momentum.get(name)
            if self.beta > 0 and previous is not None:
                if previous.shape != step.shape:
                    shapes = f"{tuple(previous.shape)}, expected {tuple(step.shape)}"
                    raise ValueError(f"momentum of {name} has shape {shapes}")
                step.addmm_(u, u.T @ previous, alpha=self.beta)  # M_t = beta U U^T M_{t-1} + Dhat_t
            if self.beta > 0:
                momentum[name] = step
            basis[name] = u
            new_params |= layer.step(base[name], step, self.eta_s)  # W_t + eta_s M_t
        self._round, self._momentum, self._basis = t, momentum, basis
        return new_params

    def _fuse(self, u: Tensor, coef: Tensor, p: Tensor, sqnorm: Tensor, mean: Tensor) -> Tensor:
        """Dhat = U (Chat - lam Cbar) + lam Dbar, [m, n]; overwrites `mean` (Dbar)."""
        coef_sq = coef.square().sum(dim=(1, 2))  # ||U C_k||_F^2 = ||C_k||_F^2, [K]
        has_delta = sqnorm > 0
        fidelity = torch.where(has_delta, coef_sq / torch.where(has_delta, sqnorm, 1.0), 1.0).clamp(0.0, 1.0)
        rows = Rows.of(coef)
        weights = reliability_weights(rows, p, fidelity, self.temperature, self.gamma, self.kappa)  # [K, r]
        fused = overlap_fusion(rows, weights, self.rho)  # Chat [r, n]
        mean_coef = torch.einsum("k,krn->rn", p, coef)  # Cbar [r, n]
        return mean.addmm_(u, fused - self.lam * mean_coef, beta=self.lam)

    def state_dict(self) -> dict[str, Tensor]:
        return join_state(self._round, {"momentum": self._momentum, "basis": self._basis})

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._round, groups = split_state(state, ["momentum", "basis"], self.name)
        self._momentum, self._basis = groups["momentum"], groups["basis"]


class _Ablation(FedCMP):
    """Fed-CMP with some hyper-parameters fixed; passing one of them is an error.

    `pinned` may hold `norm_bound`, which is no `__init__` argument (the registry sets it on
    every strategy): it is set on the instance here, and the registry neither lists nor
    overrides a pinned key.
    """

    pinned: ClassVar[dict[str, float]]

    def __init__(self, **hyper: float) -> None:
        clash = sorted(hyper.keys() & self.pinned.keys())
        if clash:
            raise ValueError(f"{self.name} fixes {clash} ({self.pinned}); do not pass them")
        fixed = {key: value for key, value in self.pinned.items() if key != NORM_BOUND_KEY}
        super().__init__(**hyper, **fixed)  # type: ignore[arg-type]
        self.norm_bound = self.pinned.get(NORM_BOUND_KEY, self.norm_bound)


class FedCMPNoReliability(_Ablation):
    """Ablation: no reliability weighting in the canonical space, w_ki = p_k (T = inf, gamma = 0)."""

    name = "fedcmp-no-reliability"
    pinned = {"temperature": math.inf, "gamma": 0.0}


class FedCMPMeanFusion(_Ablation):
    """Ablation, and the earlier formulation: the fused row is the weighted mean sum_k w_ki C_k[i] (rho = inf)."""

    name = "fedcmp-mean-fusion"
    pinned = {"rho": math.inf}


class FedCMPSampleWeights(_Ablation):
    """Ablation, and the specification's weighting: clients count by their sample shares, p_k = n_k / sum_j n_j (alpha = 1)."""

    name = "fedcmp-sample-weights"
    pinned = {"alpha": 1.0}


class FedCMPNoMomentum(_Ablation):
    """Ablation: no OPM, M_t = Dhat_t (beta = 0)."""

    name = "fedcmp-no-momentum"
    pinned = {"beta": 0.0}


class FedCMPNoNormBound(_Ablation):
    """Ablation: no norm bound, s_k = 1 (norm_bound = inf); what the default bound costs benign rounds."""

    name = "fedcmp-no-norm-bound"
    pinned = {NORM_BOUND_KEY: math.inf}
