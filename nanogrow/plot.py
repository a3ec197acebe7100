"""``loss.png``: training and validation loss against FLOPs and against tokens, growth events marked, one or
several runs overlaid. Read from each run's ``metrics.jsonl`` (nanogrow.tracking); written at the end of every run
and by ``nanogrow plot RUN_DIR [RUN_DIR ...]``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .tracking import METRICS_FILE, read_metrics


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_runs(run_dirs: list, out: str | Path, labels: list[str] | None = None) -> Path:
    """Write the loss curves of ``run_dirs`` to ``out`` (PNG). A directory without metrics.jsonl is a
    FileNotFoundError naming it."""
    runs = []
    for d in run_dirs:
        p = Path(d)
        if not (p / METRICS_FILE).is_file():
            raise FileNotFoundError(f"{p}: no {METRICS_FILE} (a run directory, train.out_dir, of a run trained by "
                                    f"this version of nanogrow)")
        runs.append(read_metrics(p))
    labels = labels or [Path(d).name or str(d) for d in run_dirs]

    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, (key, xlabel) in zip(axes, (("flops", "FLOPs"), ("tokens", "tokens"))):
        for j, (records, label) in enumerate(zip(runs, labels)):
            color = f"C{j % 10}"
            train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
            val = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
            if train:
                axis.plot([r[key] for r in train], [r["loss"] for r in train], color=color, alpha=0.55, lw=1,
                          label=f"{label} train")
            if val:
                axis.plot([r[key] for r in val], [r["val_loss"] for r in val], "o--", color=color, ms=4,
                          label=f"{label} val")
            for g in (r for r in records if r.get("kind") == "grow"):
                axis.axvline(g[key], color=color, ls=":", lw=1)
                axis.annotate(f"stage {g.get('stage')}", (g[key], 1.0), xycoords=("data", "axes fraction"),
                              rotation=90, va="top", ha="right", fontsize=7, color=color)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[0].set_title("loss against compute (dotted: growth events)")
    axes[1].set_title("loss against tokens")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
