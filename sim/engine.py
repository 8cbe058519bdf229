"""One federated run in one process: the same LocalSession, strategy and round logic as the real system.

The round loop mirrors the coordinator's: the same client selection, the same round-start
evaluation of the global on each client's held-out split, the same `train_round` call with the
same (round, local_steps), the same strategy over updates in client-id order, the same
sample-weighted metrics. So for a given seed the simulator's global projector equals the one a
real coordinator commits (checked by an integration test). On top, it scores every global on
the federation's test split, which no client sees: NLL per token and caption retrieval
accuracy after every round (retrieval on a balanced 100-image prefix per round, on the whole
split at the end). Retrieval needs as many distinct test captions as candidates; on a test split
with fewer, it is left out and `SimResult.unavailable` says why.

Bounds for the benchmark use the same trainer: `centralized` pools every client's training data
into one session trained for the same total number of steps; `local` trains each client alone.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from fedcmp.client.data import scan_data
from fedcmp.client.evaluation import caption_nll, count_distinct_captions, retrieval_accuracy
from fedcmp.client.model import ProjectorMLLM
from fedcmp.client.features import EncodedSplit, concat_splits, open_features
from fedcmp.client.trainer import LocalSession
from fedcmp.common.codec import through_wire
from fedcmp.common.projector import init_projector_params
from fedcmp.common.recipe import Recipe
from fedcmp.server.rounds import choose_clients, weighted_means
from fedcmp.server.strategies import ClientUpdate, build_strategy

Mode = Literal["federated", "centralized", "local"]
MODES: tuple[str, ...] = ("federated", "centralized", "local")
RoundCallback = Callable[[dict[str, float]], None]


@dataclass
class Federation:
    """The clients' sessions (sharing one frozen model) and the encoded test split."""

    model: ProjectorMLLM
    sessions: dict[str, LocalSession]
    test: EncodedSplit | None

    @classmethod
    def open(cls, root: Path, recipe: Recipe, cache_dir: Path | None = None, device: str = "cpu",
             load_test: bool = True) -> Federation:
        """Clients are `root/client_*` folders (client id = folder name); `root/test` is the test split."""
        folders = sorted(path for path in Path(root).iterdir() if path.is_dir() and path.name.startswith("client_"))
        if not folders:
            raise FileNotFoundError(f"{root} holds no client_* folders (write one with `fedcmp-data --out {root}`)")
        model = ProjectorMLLM.from_pretrained(recipe.vision_model, recipe.llm, recipe, device, cache_dir)
        sessions = {folder.name: LocalSession.from_scan(model, recipe, folder.name, scan_data(folder),
                                                        cache_dir=cache_dir) for folder in folders}
        test_folder = Path(root) / "test"
        test = (open_features(model, recipe, scan_data(test_folder), cache_dir=cache_dir)
                if load_test and test_folder.exists() else None)
        return cls(model, sessions, test)

    def with_recipe(self, recipe: Recipe) -> Federation:
        """The same encoded data under another recipe (strategy, lr, rounds...): no re-encoding."""
        sessions = {cid: LocalSession(cid, recipe, self.model, s.train, s.val, bad_samples=s.bad_samples)
                    for cid, s in self.sessions.items()}
        return Federation(self.model, sessions, self.test)


@dataclass
class SimResult:
    rounds: list[dict[str, float]] = field(default_factory=list)  # one row per round
    final: dict[str, float] = field(default_factory=dict)
    global_params: dict[str, Tensor] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it could not be computed


class Simulator:
    """Runs `mode` over a Federation and reports per-round metrics."""

    def __init__(self, federation: Federation, recipe: Recipe, retrieval_candidates: int = 10,
                 round_retrieval_images: int = 100) -> None:
        self.federation = federation.with_recipe(recipe)
        self.recipe = recipe
        self.retrieval_candidates = retrieval_candidates
        # Retrieval scores candidates x images caption sequences, 10x an NLL pass: after each round it
        # runs on the test split's first `round_retrieval_images` (every prefix of the split is
        # balanced over domains, styles and concepts); the final metrics use the whole split.
        self.round_retrieval_images = round_retrieval_images
        self.unavailable: dict[str, str] = {}

    def run(self, mode: Mode = "federated", on_round: RoundCallback | None = None) -> SimResult:
        if mode not in MODES:
            raise ValueError(f"unknown simulation mode {mode!r}; known: {', '.join(MODES)}")
        runner = {"federated": self._federated, "centralized": self._centralized, "local": self._local}[mode]
        self.unavailable = {}
        result = runner(on_round or (lambda row: None))
        result.unavailable = dict(self.unavailable)
        return result

    # ---- modes ------------------------------------------------------------------------------
    def _initial(self) -> dict[str, Tensor]:
        model = self.federation.model
        return init_projector_params(self.recipe.projector_type, model.vision_hidden, model.text_hidden,
                                     self.recipe.seed)

    def _federated(self, on_round: RoundCallback) -> SimResult:
        recipe, sessions = self.recipe, self.federation.sessions
        strategy = build_strategy(recipe.strategy, recipe.strategy_params)
        current = self._initial()
        result = SimResult()
        for round_index in range(1, recipe.rounds + 1):
            began = time.monotonic()
            updates = []
            downloaded = through_wire(current, recipe.wire_dtype)  # what a client decodes from the download
            for client_id in choose_clients(sessions, recipe, round_index):
                session = sessions[client_id]
                before = session.evaluate(downloaded)
                params, metrics = session.train_round(downloaded, round_index - 1,
                                                      recipe.local_steps_for(session.num_train_samples))
                updates.append(ClientUpdate(client_id, int(metrics["samples"]), through_wire(params, recipe.wire_dtype),
                                            {**metrics, **before}))
            conflict = update_cosine(current, updates)
            current = strategy.aggregate(current, updates)
            row = {"round": float(round_index), "participants": float(len(updates)), "update_cosine": conflict,
                   "duration_s": time.monotonic() - began,
                   **weighted_means([(u.num_samples, u.metrics) for u in updates]),
                   **self._test_metrics(current, self.round_retrieval_images)}
            result.rounds.append(row)
            on_round(row)
        return self._finish(result, current)

    def _centralized(self, on_round: RoundCallback) -> SimResult:
        """All training data in one session; each round takes as many steps as all clients together."""
        recipe, sessions = self.recipe, self.federation.sessions
        pooled = LocalSession("centralized", recipe, self.federation.model,
                              concat_splits([s.train for s in sessions.values()]),
                              concat_splits([s.val for s in sessions.values()]))
        steps = sum(recipe.local_steps_for(s.num_train_samples) for s in sessions.values())
        current = self._initial()
        result = SimResult()
        for round_index in range(1, recipe.rounds + 1):
            current, metrics = pooled.train_round(current, round_index - 1, steps)
            row = {"round": float(round_index), **metrics, **self._test_metrics(current, self.round_retrieval_images)}
            result.rounds.append(row)
            on_round(row)
        return self._finish(result, current)  # the pooled validation split is the clients' together

    def _local(self, on_round: RoundCallback) -> SimResult:
        """Every client trains alone for all rounds; metrics are sample-weighted over the clients.

        Per round only the test NLL of each client's projector is scored (retrieval for every client
        every round would cost K times the federated run); retrieval comes with the final metrics.
        """
        recipe, sessions = self.recipe, self.federation.sessions
        projectors = {client_id: self._initial() for client_id in sessions}
        result = SimResult()
        for round_index in range(1, recipe.rounds + 1):
            rows = []
            for client_id, session in sessions.items():
                projectors[client_id], metrics = session.train_round(
                    projectors[client_id], round_index - 1, recipe.local_steps_for(session.num_train_samples))
                rows.append((session.num_train_samples,
                             {**metrics, **self._test_metrics(projectors[client_id])}))
            row = {"round": float(round_index), **weighted_means(rows)}
            result.rounds.append(row)
            on_round(row)
        finals = [(s.num_train_samples, self._final_metrics(projectors[cid], [s])) for cid, s in sessions.items()]
        result.final = weighted_means(finals)
        return result

    # ---- metrics ----------------------------------------------------------------------------
    def _test_metrics(self, params: dict[str, Tensor], retrieval_images: int | None = 0) -> dict[str, float]:
        """Test NLL per token of `params`, and caption retrieval accuracy on the first
        `retrieval_images` test images (None: all of them; 0: no retrieval)."""
        test = self.federation.test
        if test is None:
            return {}
        model = self.federation.model
        model.load_projector_params(params)
        metrics = {"test_nll": caption_nll(model, test.features, test.caption_ids, test.caption_mask,
                                           self.recipe.batch_size)}
        if retrieval_images == 0:
            return metrics
        subset = test.take(torch.arange(len(test))[:retrieval_images])
        distinct = count_distinct_captions(subset.caption_ids, subset.caption_mask)
        if distinct >= self.retrieval_candidates:
            metrics["test_retrieval"] = retrieval_accuracy(model, subset.features, subset.caption_ids,
                                                           subset.caption_mask, num_candidates=self.retrieval_candidates,
                                                           seed=self.recipe.seed)
        else:
            self.unavailable["test_retrieval"] = (
                f"retrieval picks the true caption among {self.retrieval_candidates} distinct ones; the "
                f"{len(subset)} scored test images carry {distinct} distinct captions")
        return metrics

    def _final_metrics(self, params: dict[str, Tensor], val_sessions: Sequence[LocalSession] = ()) -> dict[str, float]:
        """Test NLL and retrieval accuracy, plus the held-out (validation) NLL of `val_sessions`
        (default: every client's) used for tuning: `val_nll` pools their tokens, `val_nll_balanced`
        averages the clients equally, as the balanced test split weighs domains and styles."""
        metrics = self._test_metrics(params, retrieval_images=None)
        evaluations = [s.evaluate(params) for s in (val_sessions or self.federation.sessions.values())]
        scored = [e for e in evaluations if e["val_tokens"] > 0]
        if scored:
            tokens = sum(e["val_tokens"] for e in scored)
            metrics["val_nll"] = sum(e["val_loss"] * e["val_tokens"] for e in scored) / tokens
            metrics["val_nll_balanced"] = sum(e["val_loss"] for e in scored) / len(scored)
        return metrics

    def _finish(self, result: SimResult, params: dict[str, Tensor]) -> SimResult:
        result.final = self._final_metrics(params)
        result.global_params = params
        return result


def update_cosine(global_params: dict[str, Tensor], updates: Sequence[ClientUpdate]) -> float:
    """Mean pairwise cosine between the clients' updates D_k (all tensors flattened): how much they conflict."""
    deltas = torch.stack([torch.cat([(u.params[key] - global_params[key]).flatten() for key in sorted(global_params)])
                          for u in updates])  # [K, P]
    if len(updates) < 2:
        return math.nan
    unit = torch.nn.functional.normalize(deltas, dim=1)
    cosines = unit @ unit.T  # [K, K]
    off_diagonal = cosines[~torch.eye(len(updates), dtype=torch.bool)]
    return float(off_diagonal.mean())


def rounds_to_reach(rows: Sequence[dict[str, float]], target: float, key: str = "test_nll") -> float:
    """First round whose `key` is at or below `target` (NaN if never)."""
    return next((row["round"] for row in rows if row.get(key, math.inf) <= target), math.nan)
