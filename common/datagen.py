"""Federated synthetic datasets in LLaVA's pretraining format, and the ``fedcmp-data`` command.

Layout written under ``--out`` (atomically: built in a temporary sibling, then renamed)::

    client_<i>/chat.json     [{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n"},
    client_<i>/images/*.png                                    {"from": "gpt", "value": caption}]}, ...]
    test/chat.json, test/images/   balanced held-out split that no client sees
    manifest.json            scenario, seed, client sizes, per-split category/domain/style/template
                             histograms

``image`` is relative to the split's ``images/`` folder. The four scenarios are those
of the quality benchmark (docs/RESULTS.md): ``iid``, ``concept`` (Dirichlet(alpha) over object categories), ``domain`` (one
visual domain and its caption style per client) and ``quantity`` (power-law client sizes,
each client its own caption template). Everything is a function of ``--seed``; the data's
seed streams differ from the micro zoo's, and digits come from the other half of the
handwritten instances.

    fedcmp-data --out DIR [--scenario iid|concept|domain|quantity] [--clients 8]
                [--samples-per-client 200] [--test-samples 400] [--alpha 0.1] [--seed 0]
                [--image-size 32] [--force]
    fedcmp-data zoo [--cache-dir DIR]        # build (or reuse) the micro model zoo
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fedcmp.common import synthetic as syn
from fedcmp.common.cliflags import add_common_flags
from fedcmp.common.logs import setup_logging

SCENARIOS: tuple[str, ...] = ("iid", "concept", "domain", "quantity")
FORMAT_VERSION = 1
DATA_STREAM = 0x100  # numpy seed-sequence prefix of all federated data (the zoo uses another)
QUANTITY_RATIO = 20.0  # largest / smallest client in the quantity scenario
EXIT_OK, EXIT_USAGE = 0, 2


@dataclass(frozen=True)
class Sample:
    """One image-caption pair before it is written: the scene and how it is captioned."""

    scene: syn.Scene
    style: str
    template: int

    @property
    def caption(self) -> str:
        return syn.caption(self.scene, self.style, self.template)


def _any_template(rng: np.random.Generator, style: str | None = None) -> tuple[str, int]:
    """A (style, template) pair: uniform over all templates, or over those of ``style``."""
    if style is None:
        return syn.TEMPLATES[int(rng.integers(len(syn.TEMPLATES)))]
    return style, int(rng.integers(len(syn.STYLES[style])))


def quantity_sizes(num_clients: int, total: int) -> list[int]:
    """Power-law client sizes n_i ~ (i + 1)^-a, a chosen so that n_0 / n_last = QUANTITY_RATIO."""
    if num_clients == 1:
        return [total]
    a = math.log(QUANTITY_RATIO) / math.log(num_clients)
    weights = np.arange(1, num_clients + 1, dtype=np.float64) ** -a
    return [max(1, round(total * w)) for w in weights / weights.sum()]


def _dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    """Dirichlet(alpha * 1_k) via normalised gammas (guarding the all-zero underflow)."""
    g = rng.gamma(alpha, size=k)
    if g.sum() == 0.0:
        g[rng.integers(k)] = 1.0
    return g / g.sum()


def client_samples(
    scenario: str, num_clients: int, samples_per_client: int, alpha: float, rng: np.random.Generator
) -> list[list[Sample]]:
    """Draw every client's samples for ``scenario``."""
    clients: list[list[Sample]] = []
    sizes = [samples_per_client] * num_clients
    if scenario == "quantity":
        sizes = quantity_sizes(num_clients, num_clients * samples_per_client)
    for i, n in enumerate(sizes):
        if scenario == "iid":
            samples = [Sample(syn.sample_scene(rng), *_any_template(rng)) for _ in range(n)]
        elif scenario == "concept":
            p = _dirichlet(rng, alpha, len(syn.CATEGORIES))
            cats = rng.choice(len(syn.CATEGORIES), size=n, p=p)
            samples = [
                Sample(syn.sample_scene(rng, category=syn.CATEGORIES[c]), *_any_template(rng)) for c in cats
            ]
        elif scenario == "domain":
            domain = syn.DOMAINS[i % len(syn.DOMAINS)]
            style = syn.DOMAIN_STYLE[domain]
            samples = [Sample(syn.sample_scene(rng, domain=domain), *_any_template(rng, style)) for _ in range(n)]
        elif scenario == "quantity":
            style, template = syn.TEMPLATES[i % len(syn.TEMPLATES)]
            samples = [Sample(syn.sample_scene(rng), style, template) for _ in range(n)]
        else:
            raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
        clients.append(samples)
    return clients


def held_out_samples(n: int, rng: np.random.Generator, domain_style: bool = False) -> list[Sample]:
    """A held-out split balanced over domains, caption styles and (within a domain) categories.

    Sample j has domain j mod D; the domain's k-th sample has style k mod S and category
    (k + k // lcm(S, C)) mod C, so every prefix is balanced to +-1 and every (style, category)
    pair appears once per S * C samples of the domain. With `domain_style` (the `domain`
    scenario, where every domain comes with its own caption style) each domain keeps its
    style, as on the clients: the split is then balanced over domains and so over styles, and
    measures alignment rather than a domain/style pairing no site ever shows.
    """
    samples = []
    styles = syn.STYLE_NAMES
    for j in range(n):
        domain = syn.DOMAINS[j % len(syn.DOMAINS)]
        k = j // len(syn.DOMAINS)
        cats = syn.domain_categories(domain)
        category = cats[(k + k // math.lcm(len(styles), len(cats))) % len(cats)]
        scene = syn.sample_scene(rng, domain=domain, category=category)
        style = syn.DOMAIN_STYLE[domain] if domain_style else styles[k % len(styles)]
        samples.append(Sample(scene, *_any_template(rng, style)))
    return samples


def _histograms(samples: Sequence[Sample]) -> dict[str, dict[str, int]]:
    return {
        "category": dict(sorted(Counter(s.scene.category for s in samples).items())),
        "domain": dict(sorted(Counter(s.scene.domain for s in samples).items())),
        "style": dict(sorted(Counter(s.style for s in samples).items())),
        "template": dict(sorted(Counter(f"{s.style}/{s.template}" for s in samples).items())),
    }


def _write_split(folder: Path, id_prefix: str, samples: Sequence[Sample], image_size: int) -> dict:
    """Write ``folder/chat.json`` and ``folder/images/``; return the split's manifest entry."""
    (folder / "images").mkdir(parents=True)
    records = []
    for j, sample in enumerate(samples):
        sample_id = f"{id_prefix}_{j:06d}"
        Image.fromarray(syn.render(sample.scene, image_size)).save(folder / "images" / f"{sample_id}.png")
        records.append({
            "id": sample_id,
            "image": f"{sample_id}.png",
            "conversations": [
                {"from": "human", "value": f"{syn.IMAGE}\n"},
                {"from": "gpt", "value": sample.caption},
            ],
        })  # fmt: skip
    (folder / "chat.json").write_text(json.dumps(records, indent=1))
    return {"name": folder.name, "size": len(samples), "histograms": _histograms(samples)}


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless overwriting a previous output (one with a manifest)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --force to replace a previous fedcmp-data output")
    if not (out / "manifest.json").is_file():
        raise FileExistsError(f"{out} is not empty and holds no fedcmp-data manifest.json; refusing to delete it")


def generate_federation(
    out: Path,
    scenario: str,
    num_clients: int,
    samples_per_client: int,
    test_samples: int,
    seed: int,
    alpha: float = 0.1,
    image_size: int = 32,
    overwrite: bool = False,
) -> Path:
    """Write a federated dataset (clients, test split, manifest) under ``out``; returns ``out``.

    Raises FileExistsError when ``out`` is non-empty (see ``overwrite``) and ValueError on bad
    arguments.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    if num_clients < 1 or samples_per_client < 1 or test_samples < 1:
        raise ValueError("--clients, --samples-per-client and --test-samples must be >= 1")
    if alpha <= 0 or image_size < 8:
        raise ValueError("--alpha must be > 0 and --image-size >= 8")
    out = Path(out)
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)

    # the test split has its own stream: the same seed gives the same test set in every scenario
    client_rng = np.random.default_rng([DATA_STREAM, seed, 0])
    clients = client_samples(scenario, num_clients, samples_per_client, alpha, client_rng)
    held_out = held_out_samples(test_samples, np.random.default_rng([DATA_STREAM, seed, 1]),
                                domain_style=scenario == "domain")

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is shareable (e.g. a volume)
        entries = [_write_split(tmp / f"client_{i}", f"c{i}", s, image_size) for i, s in enumerate(clients)]
        manifest = {
            "format_version": FORMAT_VERSION,
            "scenario": scenario,
            "seed": seed,
            "alpha": alpha if scenario == "concept" else None,
            "image_size": image_size,
            "num_clients": num_clients,
            "client_sizes": [e["size"] for e in entries],
            "clients": entries,
            "test": _write_split(tmp / "test", "test", held_out, image_size),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():  # empty, or a previous output being replaced: swap, then delete
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / out.name)
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedcmp-data",
        description="Write a synthetic federated image-caption dataset in LLaVA format. "
        "`fedcmp-data zoo` builds the micro model zoo instead (see `fedcmp-data zoo --help`).",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (must be empty or absent)")
    p.add_argument("--scenario", choices=SCENARIOS, default="iid")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--samples-per-client", type=int, default=200, help="(quantity: the mean)")
    p.add_argument("--test-samples", type=int, default=400)
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration (concept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--force", action="store_true", help="replace a previous fedcmp-data output at --out")
    add_common_flags(p)
    return p


def _zoo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedcmp-data zoo", description="Build (or reuse) the micro model zoo.")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $FEDCMP_CACHE or ~/.cache/fedcmp")
    add_common_flags(p)
    return p


def _run_zoo(argv: list[str]) -> int:
    from fedcmp.common.zoo import ensure_micro_zoo  # imports torch: only for this command

    args = _zoo_parser().parse_args(argv)
    setup_logging(log_format=args.log_format)
    zoo = ensure_micro_zoo(args.cache_dir)
    manifest = zoo.manifest()
    print(f"micro zoo: {zoo.root} (version {manifest['version']}, built in {manifest['build_seconds']} s)")
    print(f"  vision: {zoo.vision_path}  readout: {json.dumps(manifest['vision']['metrics']['readout'])}")
    print(f"  llm:    {zoo.llm_path}  perplexity: {json.dumps(manifest['llm']['metrics']['perplexity_after'])}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["zoo"]:
        return _run_zoo(argv[1:])
    args = _data_parser().parse_args(argv)
    setup_logging(log_format=args.log_format)
    try:
        out = generate_federation(
            args.out, args.scenario, args.clients, args.samples_per_client, args.test_samples,
            args.seed, alpha=args.alpha, image_size=args.image_size, overwrite=args.force,
        )  # fmt: skip
    except (FileExistsError, ValueError) as exc:
        print(f"fedcmp-data: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"wrote {out}: scenario {args.scenario}, clients {manifest['client_sizes']}, test {manifest['test']['size']}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
