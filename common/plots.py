"""Plots of a run's metrics file (JSON lines written by the coordinator's store)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_run(metrics_file: Path, out: Path) -> Path:
    """Train loss and held-out loss of the global projector per round."""
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    rounds = [row for row in rows if row.get("event") == "round"]
    final = next((row for row in rows if row.get("event") == "final"), None)
    figure, axis = plt.subplots(figsize=(6, 4))
    # A round row keeps the clients' metric means under "metrics", apart from the server's fields.
    axis.plot([r["round"] for r in rounds], [r["metrics"].get("train_loss", float("nan")) for r in rounds], "o-",
              label="client train loss")
    # Round r's val_loss is the global it started from (version r-1); the final row is version R.
    held_out = [(r["round"] - 1, r["metrics"]["val_loss"]) for r in rounds if "val_loss" in r["metrics"]]
    if final and "val_loss" in final:
        held_out.append((final["global_version"], final["val_loss"]))
    if held_out:
        axis.plot(*zip(*held_out), "s--", label="held-out loss of global v")
    axis.set_xlabel("round / global version")
    axis.set_ylabel("caption NLL per token")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
