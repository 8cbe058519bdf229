"""Local-step throughput of fedcmp's client against a plain transformers LLaVA loop, side by side.

Both train the same projector on the same frozen backbones, the same batches (fedcmp's batch
stream), batch size, dtype and device:

- **plain**: transformers' `LlavaForConditionalGeneration` as LLaVA's stage 1 drives it: each
  step does what LLaVA's dataset and collator do (open and decode the images, run the image
  processor, tokenize the captions, pad to the batch's longest), then calls the model with
  `input_ids` (BOS + one `<image>` token per patch + caption + "\\n"), `pixel_values`,
  `attention_mask`, `labels` (-100 on BOS, image and padding) and `use_cache=False` (LLaVA's
  train.py); `loss.backward()`, AdamW step on the projector.
- **fedcmp, cache on** / **cache off**: `LocalSession.train_round` of the sessions `fedcmp-client`
  opens with `--feature-cache disk` (features encoded once into the memory-mapped cache, not
  timed) and `--feature-cache off` (`LiveFeatures`: the vision tower on every batch, `--workers`
  DataLoader processes decoding the images ahead, as the client's default 2).

Backbones are random, of LLaVA-1.5-7B's shapes scaled down: CLIP ViT-L/14-336 with widths and
depth / 4 and the image side / 2 (144 patches instead of 576), Vicuna-7B with widths and depth
/ 8 and its vocabulary of 32000 / 64 = 500 (the LM's body shrinks 512-fold, so a vocabulary
shrunk 64-fold keeps the LM head's share of the LM's compute as at 7B, about 2%; `--vocab 32000`
keeps Vicuna's own), the micro zoo's byte-level tokenizer (418 tokens). The three loops run
interleaved, `--repeats` times, so all see the same machine load; for each the script prints the
median samples/s by wall clock and by CPU time (this process's and its decoding workers'; with
one thread, close to the wall time of an unloaded machine, and far less disturbed by other
processes), and the ratios of fedcmp to plain, medians of the per-repeat ratios. Before timing,
both sides' losses on the first batch are printed: they must agree (same objective). After it,
where one batch's CPU time goes: the plain loop's inputs (decoding, image processor,
tokenization), the whole vision tower, fedcmp's vision features (the tower up to the selected
layer), fedcmp's cached forward and backward, the whole plain step.

    python bench/bench_train_throughput.py [--batch-size 8] [--steps 2] [--repeats 8] [--threads 1]
                                           [--workers 2] [--vocab 500] [--device cpu] [--precision fp32]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaConfig
from transformers import LlamaForCausalLM

from fedcmp.client.data import DataOptions, scan_data
from fedcmp.client.precision import autocast
from fedcmp.client.trainer import LocalSession, batch_schedule
from fedcmp.common.datagen import generate_federation
from fedcmp.common.recipe import Recipe
from fedcmp.common.zoo import ensure_micro_zoo

from proc_sampler import live_descendants_cpu_s

# LLaVA-1.5-7B: CLIP ViT-L/14-336 (1024 wide, 4096 MLP, 24 layers, 16 heads, 336 px, 14 px
# patches) and Vicuna-7B (4096 wide, 11008 MLP, 32 layers, 32 heads, 32000 tokens); scaled down.
VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
              image_size=168, patch_size=14)
LLM = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=1024)
VOCAB = 500  # Vicuna's 32000 / 64: head (width x vocab, / 8 x / 64) shrinks as the body (width^2 x depth, / 512)


def save_backbones(root: Path, vocab: int, cache_dir: Path | None) -> tuple[Path, Path]:
    """Random backbones of the scaled shapes, saved as any checkpoint is (vision, llm folders)."""
    tokenizer = AutoTokenizer.from_pretrained(ensure_micro_zoo(cache_dir).llm_path)
    torch.manual_seed(0)
    vision, llm = root / "vision", root / "llm"
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(vision)
    side = VISION["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(vision)
    config = LlamaConfig(**LLM, vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    return vision, llm


class PlainLlavaLoop:
    """LLaVA's stage-1 step in plain transformers: per step, what LLaVA's dataset and collator do
    (open and decode the images, run the image processor, tokenize the captions, pad to the batch's
    longest), then the full Llava forward with labels, backward, AdamW step on the projector."""

    def __init__(self, session: LocalSession, paths: Sequence[Path], captions: Sequence[str]) -> None:
        self.model = session.model
        self.paths, self.captions = list(paths), list(captions)
        self.tower_dtype = next(self.model.llava.model.vision_tower.parameters()).dtype
        self.optimizer = torch.optim.AdamW(self.model.projector.parameters(), lr=session.recipe.lr, weight_decay=0.0)

    def inputs(self, rows: Tensor) -> dict[str, Tensor]:
        """input_ids [B, 1 + P + L], attention_mask, labels (-100 but on the caption), pixel_values."""
        model, device = self.model, self.model.device
        caption_ids, caption_mask = model.template.encode([self.captions[row] for row in rows.tolist()])  # [B, L]
        input_ids, attention_mask, labels = model.template.llava_inputs(
            caption_ids, caption_mask, model.image_token_id, model.num_image_tokens)  # [B, 1 + P + L] each
        images = [Image.open(self.paths[row]).convert("RGB") for row in rows.tolist()]
        pixel_values = model.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                "labels": labels.to(device), "pixel_values": pixel_values.to(device, self.tower_dtype)}

    def loss(self, rows: Tensor) -> Tensor:
        with autocast(self.model.precision, self.model.device):
            return self.model.llava(**self.inputs(rows), use_cache=False).loss  # LLaVA's train.py: use_cache False

    def train(self, schedule: Tensor) -> None:
        for rows in schedule:  # [B] each
            self.loss(rows).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children, finished or alive (the DataLoader's
    decoding workers, which the cache-off store keeps across rounds)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    finished = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return finished + live_descendants_cpu_s(os.getpid())


def timed(run: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process and the workers it started) of `run`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), cpu_seconds()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def breakdown(session: LocalSession, plain: PlainLlavaLoop, rows: Tensor, repeats: int) -> None:
    """Median CPU milliseconds of one batch's parts, interleaved `repeats` times (after a warm-up)."""
    model = session.model

    def fedcmp_step() -> None:
        batch = next(session.train.batches([rows]))
        nll, tokens = model.caption_nll(batch.features, batch.caption_ids, batch.caption_mask)
        (nll.sum() / tokens.sum()).backward()

    pixel_values = plain.inputs(rows)["pixel_values"]

    @torch.no_grad()
    def whole_tower() -> None:
        model.llava.model.vision_tower(pixel_values, output_hidden_states=True)

    parts: dict[str, Callable[[], object]] = {
        "plain loop's inputs (decode, image processor, tokenize)": lambda: plain.inputs(rows),
        "vision tower forward, every layer (as the plain loop runs it)": whole_tower,
        "fedcmp's vision features (the tower up to its selected layer)": lambda: model.image_features(pixel_values),
        "fedcmp cached step (features read, LM forward + backward)": fedcmp_step,
        "plain loop's whole step (inputs, Llava forward + backward)": lambda: plain.loss(rows).backward(),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    for repeat in range(repeats + 1):
        for name, part in parts.items():
            start = cpu_seconds()
            part()
            if repeat:
                times[name].append(cpu_seconds() - start)
    model.projector.zero_grad(set_to_none=True)
    for name, seconds in times.items():
        print(f"one batch, CPU time: {name}: median {1000 * statistics.median(seconds):.0f} ms")


def report(name: str, rates: dict[str, list[float]], unit: str) -> None:
    """Median rate of each loop and median per-repeat ratio of fedcmp's to plain's."""
    print(f"{name}: plain transformers median {statistics.median(rates['plain']):.2f} {unit}")
    for loop in ("cache on", "cache off"):
        ratios = [mine / theirs for mine, theirs in zip(rates[loop], rates["plain"])]
        print(f"{name}: fedcmp {loop:9s} median {statistics.median(rates[loop]):.2f} {unit}, ratio to plain "
              f"{statistics.median(ratios):.2f} (per repeat: {', '.join(f'{ratio:.2f}' for ratio in ratios)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--samples", type=int, default=48, help="examples in the synthetic dataset")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=DataOptions.workers,
                        help="fedcmp-client's --workers: processes decoding images with the cache off")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="the LM's vocabulary (Vicuna: 32000)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--cache-dir", type=Path, help="where the micro zoo is (its tokenizer); default $FEDCMP_CACHE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vision, llm = save_backbones(root, args.vocab, args.cache_dir)
        data = generate_federation(root / "data", "iid", num_clients=1, samples_per_client=args.samples,
                                   test_samples=1, seed=0, image_size=336) / "client_0"
        recipe = Recipe(vision_model=str(vision), llm=str(llm), batch_size=args.batch_size, val_fraction=0.0,
                        lr=1e-3, lr_schedule="constant", precision=args.precision)
        options = DataOptions(feature_cache_dir=root / "features", workers=args.workers)
        # What fedcmp-client opens with --feature-cache disk and with --feature-cache off, on one shared model.
        cached = LocalSession.open(data, recipe, client_id="bench", device=args.device, options=options)
        model, device = cached.model, cached.model.device
        live = LocalSession.from_scan(model, recipe.overridden({"feature_cache": "off"}, "the benchmark"), "bench",
                                      scan_data(data, options), options)
        scanned = scan_data(data, options)  # val_fraction 0: the train split is every row, in order
        paths = [scanned.source.entry(row).image_path for row in scanned.rows.tolist()]
        plain = PlainLlavaLoop(cached, paths, scanned.captions)
        params = model.projector_params()

        first = batch_schedule(recipe.seed, "bench", 0, 1, args.batch_size, cached.num_train_samples)[0]  # [B]
        with torch.no_grad():
            losses = {}
            for name, session in (("cache on", cached), ("cache off", live)):
                batch = next(session.train.batches([first]))
                nll, tokens = model.caption_nll(batch.features, batch.caption_ids, batch.caption_mask)
                losses[name] = (nll.sum() / tokens.sum()).item()
            plain_loss = plain.loss(first).item()
        print(f"loss on the first batch: fedcmp cache on {losses['cache on']:.6f}, cache off "
              f"{losses['cache off']:.6f} (features rounded to {recipe.feature_dtype}), plain transformers "
              f"{plain_loss:.6f}")
        print(f"shapes: vision {VISION}, llm {LLM}, vocab {args.vocab}; {model.num_image_tokens} image tokens, "
              f"batch {args.batch_size}, {args.precision} on {device}, {args.threads} threads, "
              f"{args.workers} decoding workers with the cache off")

        def fedcmp(session: LocalSession, round_index: int) -> Callable[[], None]:
            return lambda: session.train_round(params, round_index, args.steps)

        def plain_run(round_index: int) -> Callable[[], None]:
            schedule = batch_schedule(recipe.seed, "bench", round_index, args.steps, args.batch_size,
                                      cached.num_train_samples)
            return lambda: plain.train(schedule)

        samples = args.steps * args.batch_size
        wall_rates: dict[str, list[float]] = {"plain": [], "cache on": [], "cache off": []}
        cpu_rates: dict[str, list[float]] = {"plain": [], "cache on": [], "cache off": []}
        for repeat in range(args.repeats + 1):  # the first is a warm-up, not recorded
            runs = {"plain": plain_run(repeat), "cache on": fedcmp(cached, repeat), "cache off": fedcmp(live, repeat)}
            for name, run in runs.items():
                wall, cpu = timed(run, device)
                if repeat:
                    wall_rates[name].append(samples / wall)
                    cpu_rates[name].append(samples / cpu)
        report("wall clock", wall_rates, "samples/s")
        report("CPU time", cpu_rates, "samples per CPU-second")
        breakdown(cached, plain, first, args.repeats)


if __name__ == "__main__":
    main()
