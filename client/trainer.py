"""One client's local training: its data, model and cached features, and the per-round loop.

A `LocalSession` is opened once per client and reused round after round (by the daemon and by
the in-process simulator). Its splits read features through `fedcmp.client.features`: from the
on-disk cache (the frozen tower ran once) or from the tower live, which the loop does not see.

Determinism: the batches of a round are a pure function of (recipe.seed, client_id,
round_index, local_steps, num_train_samples). Training reads a stream of successive seeded
permutations of the train split (epoch e is the permutation seeded by hash(seed, client_id, e)),
and round r consumes stream positions [r * local_steps * B, (r + 1) * local_steps * B). A client
restarted at round r therefore trains on exactly the batches it would have had, and the
optimizer is fresh each round, so a round depends only on the global projector it starts from.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fedcmp.client.data import DataOptions, ScannedData, scan_data
from fedcmp.client.distributed import Replicas
from fedcmp.client.evaluation import caption_nll
from fedcmp.client.features import CaptionBatch, EncodedSplit, open_features, split_session_data
from fedcmp.client.model import ProjectorMLLM
from fedcmp.client.precision import grad_scaler
from fedcmp.client.schedule import round_learning_rates
from fedcmp.common.recipe import Recipe


def batch_schedule(
    seed: int, client_id: str, round_index: int, local_steps: int, batch_size: int, num_samples: int
) -> Tensor:
    """Train-split indices [local_steps, batch_size] of round `round_index`'s batches."""
    if num_samples < 1:
        raise ValueError("cannot schedule batches over an empty train split")
    start = round_index * local_steps * batch_size
    positions = torch.arange(start, start + local_steps * batch_size)  # [S * B] stream positions
    epochs = positions // num_samples  # [S * B]
    indices = torch.empty_like(positions)
    for epoch in torch.unique(epochs).tolist():
        in_epoch = epochs == epoch
        indices[in_epoch] = _epoch_permutation(seed, client_id, epoch, num_samples)[positions[in_epoch] % num_samples]
    return indices.view(local_steps, batch_size)


def _epoch_permutation(seed: int, client_id: str, epoch: int, num_samples: int) -> Tensor:
    digest = hashlib.sha256(f"fedcmp-batches:{seed}:{client_id}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randperm(num_samples, generator=generator)


@dataclass
class LocalSession:
    """One client's model, recipe and encoded train/val splits."""

    client_id: str
    recipe: Recipe
    model: ProjectorMLLM
    train: EncodedSplit
    val: EncodedSplit
    show_progress: bool = False
    replicas: Replicas = field(default_factory=Replicas)  # the ranks sharing each step (one process by default)
    bad_samples: int = 0  # rows of the site's data skipped as unusable

    @classmethod
    def open(
        cls,
        data: Path | ScannedData,
        recipe: Recipe,
        client_id: str,
        device: str = "cpu",
        cache_dir: Path | None = None,
        options: DataOptions = DataOptions(),
        show_progress: bool = False,
    ) -> LocalSession:
        """Scan the data (unless already scanned), load the model, and make the features ready."""
        scanned = data if isinstance(data, ScannedData) else scan_data(data, options)
        model = ProjectorMLLM.from_pretrained(recipe.vision_model, recipe.llm, recipe, device, cache_dir)
        return cls.from_scan(model, recipe, client_id, scanned, options, cache_dir, show_progress)

    @classmethod
    def from_scan(
        cls,
        model: ProjectorMLLM,
        recipe: Recipe,
        client_id: str,
        scanned: ScannedData,
        options: DataOptions = DataOptions(),
        cache_dir: Path | None = None,
        show_progress: bool = False,
    ) -> LocalSession:
        """A session over scanned data and a loaded model (the simulator shares one model among clients)."""
        whole = open_features(model, recipe, scanned, options, cache_dir, show_progress)
        train, val = split_session_data(whole, recipe)
        return cls(client_id, recipe, model, train, val, show_progress, bad_samples=len(scanned.bad.rows))

    @property
    def num_train_samples(self) -> int:
        return len(self.train)

    @property
    def num_val_samples(self) -> int:
        return len(self.val)

    def signature(self) -> dict[str, tuple[int, ...]]:
        return self.model.signature()

    def data_metrics(self) -> dict[str, float]:
        """What the client reports about its data with every update."""
        return {"bad_samples": float(self.bad_samples)}

    def evaluate(self, params: dict[str, Tensor]) -> dict[str, float]:
        """Mean token NLL of `params` on the val split and its token count.

        A client without a val split (val_fraction 0, or a single example) reports
        val_loss NaN with val_tokens 0: weight val losses by val_tokens when combining them.
        """
        if len(self.val) == 0:
            return {"val_loss": math.nan, "val_tokens": 0.0}
        self.model.load_projector_params(params)
        val = self.val
        val_loss = caption_nll(self.model, val.features, val.caption_ids, val.caption_mask,
                               self.recipe.forward_batch_size)
        return {"val_loss": val_loss, "val_tokens": float(val.caption_mask.sum().item())}

    def train_round(
        self, global_params: dict[str, Tensor], round_index: int, local_steps: int,
        on_step: Callable[[int, float], None] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """`local_steps` optimizer steps from `global_params`; returns the local projector and metrics.

        Each step takes `batch_size` examples, forwarded `micro_batch_size` at a time with the
        gradients accumulated in between; the loss is the mean NLL per supervised token of the
        whole step's batch, so accumulation gives the update of one big batch. The rate of each
        step follows the run-wide schedule (`fedcmp.client.schedule`).
        `on_step(steps_done, loss)` is called after every optimizer step (heartbeat and progress log).
        """
        if local_steps < 1:
            raise ValueError(f"local_steps must be at least 1, got {local_steps}")
        recipe, model = self.recipe, self.model
        model.load_projector_params(global_params)
        projector = model.projector
        anchor = {name: param.detach().clone() for name, param in projector.named_parameters()}  # w_global, for FedProx
        optimizer_class = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.SGD
        optimizer = optimizer_class(projector.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        scaler = grad_scaler(model.precision, model.device)  # fp16 only; a pass-through otherwise
        rates = round_learning_rates(recipe, round_index, local_steps)

        schedule = batch_schedule(
            recipe.seed, self.client_id, round_index, local_steps, recipe.batch_size, self.num_train_samples
        )  # [local_steps, B]
        # per step: this rank's share of the batch (all of it for one process), in micro-batches of [m] rows
        step_rows = [self.replicas.share(batch).split(recipe.forward_batch_size) for batch in schedule]
        micro_batches = self.train.batches([rows for rows_of_step in step_rows for rows in rows_of_step])
        losses: list[float] = []
        disable = None if self.show_progress else True  # None: tqdm shows the bar only on a terminal
        progress = tqdm(zip(schedule, step_rows, rates), total=local_steps, desc=f"round {round_index}",
                        unit="step", leave=False, disable=disable)
        for batch, rows_of_step, rate in progress:
            for group in optimizer.param_groups:
                group["lr"] = rate
            total_tokens = self.train.caption_mask[batch].sum()  # supervised tokens of the whole step, all ranks
            step_batches = itertools.islice(micro_batches, len(rows_of_step))
            losses.append(self._accumulate_gradients(step_batches, len(rows_of_step), total_tokens, scaler))
            if recipe.proximal_mu > 0:  # after the ranks' all-reduce: every rank adds the same term
                distance = sum(((param - anchor[name]) ** 2).sum() for name, param in projector.named_parameters())
                scaler.scale(recipe.proximal_mu / 2 * distance).backward()
            scaler.step(optimizer)  # skipped if fp16 gradients overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{rate:.2e}")
            if on_step is not None:
                on_step(len(losses), losses[-1])

        metrics = {
            "train_loss": math.fsum(losses) / len(losses),
            "train_loss_last": losses[-1],
            "lr_last": rates[-1],
            "steps": float(local_steps),
            "samples": float(local_steps * recipe.batch_size),
        }
        return model.projector_params(), metrics

    def _accumulate_gradients(
        self, micro_batches: Iterable[CaptionBatch], count: int, total_tokens: Tensor, scaler: torch.amp.GradScaler
    ) -> float:
        """Backward the mean token NLL of a step's batch, one micro-batch at a time; returns that loss.

        With several ranks, `micro_batches` (`count` of them) are this rank's share of the step;
        the loss is scaled by the number of ranks since DDP averages their gradients
        (fedcmp.client.distributed), and the gradients are all-reduced on the last micro-batch.
        """
        model, replicas = self.model, self.replicas
        projector = replicas.forward_module(model.projector)
        nll_sum = torch.zeros((), device=model.device)
        for index, micro_batch in enumerate(micro_batches):
            with replicas.gradient_sync(last=index == count - 1):
                nll, _ = model.caption_nll(
                    micro_batch.features, micro_batch.caption_ids, micro_batch.caption_mask, projector
                )  # [m]
                scaler.scale(nll.sum() * replicas.world_size / total_tokens).backward()
            nll_sum += nll.detach().sum()
        return (replicas.sum(nll_sum) / total_tokens).item()
