"""Where a run's numbers go: ``out_dir/metrics.jsonl`` always, TensorBoard and wandb when the config asks.

One record per logged training step, per evaluation and per growth event, the same dict for every sink:

    {"kind": "train", "step": 20, "tokens": 40960, "flops": 8.1e11, "loss": 5.91, "lr": 0.003, "grad_norm": 0.84,
     "tokens_per_s": 5123.0, "mfu": 0.21, "stage": 0, "params": 2510000, "seconds": 8.2}
    {"kind": "eval", "step": 100, "tokens": ..., "flops": ..., "val_loss": 5.1, "stage": 0}
    {"kind": "grow", "step": 100, "tokens": ..., "flops": ..., "stage": 1, "params_before": ..., "params_after": ...,
     "val_loss_before": 5.1, "val_loss_after": 5.3, "op": "stack", "seconds": 0.12}

Growth changes FLOPs per token, so steps are a poor x-axis for comparing runs: every record carries tokens and
FLOPs. TensorBoard's x-axis is an integer step, so each scalar is also written under ``by_tokens/`` (x = tokens)
and ``by_gflops/`` (x = GFLOPs); wandb gets ``tokens`` and ``flops`` as metrics to plot against. Growth events are
markers: ``growth/stage`` (a step function of the stage index) and a text entry in TensorBoard, ``growth/*`` in wandb.
Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (a run directory or the file itself); a torn last line is skipped."""
    p = Path(path)
    p = p / METRICS_FILE if p.is_dir() else p
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class Trackers:
    """metrics.jsonl plus the trackers the config asks for (``train.tensorboard``, ``train.wandb``). A fresh run
    starts the file afresh; a resume at step S keeps the records up to S (later ones belong to steps about to be
    trained again)."""

    def __init__(self, out_dir: str | Path, rank: int, t, run_config: dict, resume_step: int | None = None):
        self.rank = rank
        self.path = Path(out_dir) / METRICS_FILE
        self._tb = None
        self._wandb = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        name = t.run_name or Path(out_dir).resolve().name
        if t.tensorboard:  # config validation made sure tensorboard is installed
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(Path(out_dir) / "tb"))
        if t.wandb:
            import wandb
            self._wandb = wandb.init(project=t.wandb_project, name=name, config=run_config, dir=str(out_dir))
            for axis in ("tokens", "flops"):
                wandb.define_metric(axis)

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        kind, step = record["kind"], int(record["step"])
        scalars = {k: float(v) for k, v in record.items()
                   if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and v is not None and math.isfinite(v)}
        if self._tb is not None:
            self._log_tensorboard(kind, step, record, scalars)
        if self._wandb is not None:
            data = {f"{kind}/{k}": v for k, v in scalars.items() if k not in ("tokens", "flops")}
            data.update(tokens=record.get("tokens", 0), flops=record.get("flops", 0.0))
            self._wandb.log(data, step=step)

    def _log_tensorboard(self, kind: str, step: int, record: dict, scalars: dict) -> None:
        tokens, gflops = int(record.get("tokens", 0)), int(record.get("flops", 0.0) / 1e9)
        for k, v in scalars.items():
            if k in ("tokens", "flops"):
                continue
            self._tb.add_scalar(f"{kind}/{k}", v, step)
            if k in ("loss", "val_loss", "stage", "params", "params_after"):  # what one plots against compute
                self._tb.add_scalar(f"by_tokens/{kind}_{k}", v, tokens)
                self._tb.add_scalar(f"by_gflops/{kind}_{k}", v, gflops)
        if kind == "grow":
            self._tb.add_text("growth", f"stage {record.get('stage')}: {record.get('op')} "
                                        f"{record.get('params_before'):,} -> {record.get('params_after'):,} params",
                              step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
