"""Local-step throughput of fedcmp's client against a plain transformers LLaVA loop, side by side.

Both train the same projector on the same frozen backbones, the same batches (fedcmp's batch
stream), batch size, dtype and device:

- **plain**: transformers' `LlavaForConditionalGeneration` as LLaVA's stage 1 drives it: each
  step decodes the images, runs the image processor, and calls the model with `input_ids`
  (BOS + one `<image>` token per patch + caption + "\\n"), `pixel_values`, `attention_mask` and
  `labels` (-100 on BOS, image and padding); `loss.backward()`, AdamW step on the projector.
- **fedcmp, cache on**: `LocalSession.train_round`, features precomputed once (not timed).
- **fedcmp, cache off**: the same `train_round`, with a feature store that decodes the images
  and runs the vision tower on every batch (`ProjectorMLLM.encode_images`), as the plain loop.

Backbones are random, of LLaVA-1.5-7B's shapes scaled down: CLIP ViT-L/14-336 with widths and
depth / 4 and the image side / 2 (144 patches instead of 576), Vicuna-7B with widths and depth
/ 8 and its vocabulary of 32000 / 64 = 500 (the LM's body shrinks 512-fold, so a vocabulary
shrunk 64-fold keeps the LM head's share of the LM's compute as at 7B, about 2%; `--vocab 32000`
keeps Vicuna's own), the micro zoo's byte-level tokenizer (418 tokens). The three loops run
interleaved, `--repeats` times, so all see the same machine load; for each the script prints the
median samples/s by wall clock and by this process's CPU time (with one thread, close to the
wall time of an unloaded machine, and far less disturbed by other processes), and the ratios of
fedcmp to plain, medians of the per-repeat ratios. Before timing, both sides' losses on the
first batch are printed: they must agree (same objective).

    python bench/bench_train_throughput.py [--batch-size 8] [--steps 2] [--repeats 8]
                                           [--threads 1] [--vocab 500] [--device cpu] [--precision fp32]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaConfig
from transformers import LlamaForCausalLM

from fedcmp.client.data import load_llava_json
from fedcmp.client.features import EncodedSplit
from fedcmp.client.model import ProjectorMLLM
from fedcmp.client.precision import autocast
from fedcmp.client.trainer import LocalSession, batch_schedule
from fedcmp.common.datagen import generate_federation
from fedcmp.common.recipe import Recipe
from fedcmp.common.zoo import ensure_micro_zoo

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


class LiveTower:
    """A feature store that decodes the images and runs the frozen tower on every batch (cache off)."""

    def __init__(self, model: ProjectorMLLM, paths: Sequence[Path]) -> None:
        self.model = model
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, rows: Tensor) -> Tensor:
        paths = [self.paths[row] for row in rows.tolist()]
        return self.model.encode_images(paths, batch_size=len(paths))  # [b, P, vision_hidden]

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[Tensor]:
        return (self[rows] for rows in index_batches)


class PlainLlavaLoop:
    """LLaVA's stage-1 step in plain transformers: image loading, processor, full Llava forward with labels."""

    def __init__(self, session: LocalSession, paths: Sequence[Path]) -> None:
        self.model = session.model
        self.split = session.train
        self.paths = list(paths)
        self.recipe = session.recipe
        self.tower_dtype = next(self.model.llava.model.vision_tower.parameters()).dtype
        self.optimizer = torch.optim.AdamW(self.model.projector.parameters(), lr=session.recipe.lr, weight_decay=0.0)

    def inputs(self, rows: Tensor) -> dict[str, Tensor]:
        """input_ids [B, 1 + P + L], attention_mask, labels (-100 but on the caption), pixel_values."""
        model, device = self.model, self.model.device
        caption_ids, caption_mask = self.split.caption_ids[rows], self.split.caption_mask[rows]  # [B, L]
        batch = rows.shape[0]
        prefix = torch.tensor(model.template.prefix_ids, dtype=torch.long).expand(batch, -1)  # [B, 1]: BOS
        image = torch.full((batch, model.num_image_tokens), model.image_token_id)  # [B, P]
        pad = model.tokenizer.pad_token_id
        input_ids = torch.cat([prefix, image, caption_ids.masked_fill(caption_mask == 0, pad)], dim=1)
        attention_mask = torch.cat([torch.ones_like(prefix), torch.ones_like(image), caption_mask], dim=1)
        labels = torch.cat([torch.full_like(prefix, -100), torch.full_like(image, -100),
                            caption_ids.masked_fill(caption_mask == 0, -100)], dim=1)
        images = [Image.open(self.paths[row]).convert("RGB") for row in rows.tolist()]
        pixel_values = model.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                "labels": labels.to(device), "pixel_values": pixel_values.to(device, self.tower_dtype)}

    def loss(self, rows: Tensor) -> Tensor:
        with autocast(self.model.precision, self.model.device):
            return self.model.llava(**self.inputs(rows)).loss

    def train(self, schedule: Tensor) -> None:
        for rows in schedule:  # [B] each
            self.loss(rows).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def timed(run: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process) of `run`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


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
        session = LocalSession.open(data, recipe, client_id="bench", device=args.device)
        paths = [example.image_path for example in load_llava_json(data)]  # val_fraction 0: train rows in order
        model, device = session.model, session.model.device
        cached = session.train
        live = EncodedSplit(cached.ids, LiveTower(model, paths), cached.caption_ids, cached.caption_mask)
        plain = PlainLlavaLoop(session, paths)
        params = model.projector_params()

        first = batch_schedule(recipe.seed, "bench", 0, 1, args.batch_size, len(cached))[0]  # [B]
        with torch.no_grad():
            batch = next(cached.batches([first]))
            nll, tokens = model.caption_nll(batch.features, batch.caption_ids, batch.caption_mask)
            fedcmp_loss, plain_loss = (nll.sum() / tokens.sum()).item(), plain.loss(first).item()
        print(f"loss on the first batch: fedcmp {fedcmp_loss:.6f}, plain transformers {plain_loss:.6f}")
        print(f"shapes: vision {VISION}, llm {LLM}, vocab {args.vocab}; {model.num_image_tokens} image tokens, "
              f"batch {args.batch_size}, {args.precision} on {device}, {args.threads} threads")

        def fedcmp(split: EncodedSplit, round_index: int) -> Callable[[], None]:
            def run() -> None:
                session.train = split
                session.train_round(params, round_index, args.steps)
            return run

        def plain_run(round_index: int) -> Callable[[], None]:
            schedule = batch_schedule(recipe.seed, "bench", round_index, args.steps, args.batch_size, len(cached))
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

if __name__ == "__main__":
    main()
