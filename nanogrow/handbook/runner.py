"""Run a study: every arm x seed (x lr for the reference, x budget scale for its longer runs) not yet in the store.

Order: the reference over its learning-rate grid first (its best lr, the "tuned" one, is what every grown arm
trains at), then the grown arms, then the reference at the larger budgets. Each finished run is appended to the
store at once, so a study stopped at any point loses at most the run in progress.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

from .store import Store
from .study import Run, Study, config_hash

FULL_VAL_BATCHES, FULL_VAL_BATCH = 15, 32  # 480 sequences: 94% of a 65,536-token val split at seq 128


def tuned_lr(study: Study, store: Store, seeds: list[int]) -> tuple[float | None, dict]:
    """The reference's best lr: lowest mean final loss (full validation set) over ``seeds``, among the lrs of the
    grid that have all of them. Returns (lr or None, {lr: mean final loss})."""
    means = {}
    for lr in study.lr_grid:
        finals = {r["seed"]: r["final_loss"] for r in store.select(study.reference, scale=1.0, lr=lr)
                  if r["seed"] in seeds}
        if len(finals) == len(seeds):
            means[lr] = statistics.fmean(finals.values())
    if len(means) < len(study.lr_grid):
        return None, means
    return min(means, key=means.get), means


def plan_runs(study: Study, store: Store, seeds: list[int], arms: list[str] | None = None) -> list[Run]:
    """The runs still to do, in order, with the tuned lr resolved where the store already allows it."""
    todo = [r for lr in study.lr_grid for r in study.runs(study.reference, seeds, lr)]
    lr, _ = tuned_lr(study, store, seeds)
    if lr is not None:
        for name in study.arms:
            if name != study.reference and (arms is None or name in arms):
                todo += study.runs(name, seeds, lr)
        todo += study.runs(study.reference, seeds, lr, study.scratch_scales)
    return [r for r in todo if not store.has(r.key)]


def run_study(study: Study, seeds: list[int] | None = None, arms: list[str] | None = None, log=print,
              dry_run: bool = False) -> int:
    """Run what is missing; returns the number of runs made. The tuned lr is decided once the grid is done."""
    seeds = seeds or study.seeds
    unknown = [a for a in arms or [] if a not in study.arms]
    if unknown:
        raise ValueError(f"{study.path}: no arm(s) {unknown}; the study has {', '.join(study.arms)}")
    store = Store(study.store_path)
    ensure_data(study, log)
    made = 0
    while True:
        todo = plan_runs(study, store, seeds, arms)
        if not todo:
            break
        if dry_run:
            for r in todo:
                log(f"would run {r.arm} seed {r.seed} lr {r.lr:g} x{r.scale:g} ({r.cfg.train.max_steps} steps)")
            return 0
        run = todo[0]
        log(f"[{study.name}] {run.arm} | seed {run.seed} | lr {run.lr:g} | budget x{run.scale:g} | "
            f"{run.cfg.train.max_steps} steps | {len(todo) - 1} more queued")
        record = stored_elsewhere(study, run.key)
        if record is not None:  # the same config was run for another study (e.g. the shared reference)
            record = {**record, "study": study.name, "arm": run.arm, "copied_from": record["study"]}
            log(f"    the same config is in {record['copied_from']}'s store: copied, not rerun")
        else:
            record = execute(study, run)
        store.append(record)
        made += 1
        log(f"    final loss {record['final_loss']:.4f} (+- {record['final_loss_se']:.4f}), "
            f"{record['flops']:.3e} FLOPs, {record['wall_seconds']:.0f} s")
    lr, means = tuned_lr(study, store, seeds)
    log(f"[{study.name}] complete for seeds {seeds}: tuned lr {lr:g} "
        f"({', '.join(f'{k:g}: {v:.4f}' for k, v in means.items())})")
    return made


def retime(study: Study, arm: str, seeds: list[int] | None = None, log=print) -> int:
    """Run ``arm``'s records at the tuned lr and budget x1 again and replace them in every store that holds the same
    config. For wall-clock hygiene only: the losses and FLOPs of a seeded run reproduce, its seconds do not when the
    machine was loaded while it ran (two runs on two cores, a test suite). Returns the number of runs made."""
    seeds = seeds or study.seeds
    store = Store(study.store_path)
    lr, _ = tuned_lr(study, store, seeds)
    if lr is None:
        raise ValueError(f"{study.path}: the reference's lr grid is not complete; nothing to retime")
    made = 0
    for run in study.runs(arm, seeds, lr):
        log(f"[{study.name}] retiming {arm} seed {run.seed} (lr {lr:g})")
        record = execute(study, run)
        for path in sorted(study.store_path.parent.glob("*.jsonl")):
            other = Store(path)
            if not other.has(run.key):
                continue
            records = [({**record, "study": r["study"], "arm": r["arm"], "retimed": True,
                         **({"copied_from": study.name} if r["study"] != study.name else {})}
                        if r["config_hash"] == run.key else r) for r in other.records]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r, separators=(",", ":"), sort_keys=True) + "\n" for r in records))
            os.replace(tmp, path)  # atomic: a reader sees the old store or the new one
        made += 1
        log(f"    {record['wall_seconds']:.0f} s, final loss {record['final_loss']:.4f}")
    return made


def stored_elsewhere(study: Study, key: str) -> dict | None:
    """A record of the config ``key`` in another study's store next to this one (runs are identified by their
    config, so a reference shared by several studies is trained once)."""
    for path in sorted(study.store_path.parent.glob("*.jsonl")):
        if path != study.store_path:
            for r in Store(path).records:
                if r["config_hash"] == key:
                    return r
    return None


def ensure_data(study: Study, log) -> None:
    d = Path(study.base.data.dir)
    if (d / "meta.json").exists():
        return
    if not study.prep:
        raise FileNotFoundError(f"{d} does not exist and {study.path} has no study.prep to make it")
    from ..data_prep.prepare import main as prep_main
    log(f"preparing {d}: nanogrow prep {' '.join(study.prep)} --out {d}")
    prep_main([*study.prep, "--out", str(d)])


def execute(study: Study, run: Run) -> dict:
    """Train one run and return its store record."""
    from ..train import Trainer

    # The record is keyed by the config as planned: the Trainer may rewrite fields of the config it is given (with
    # train.max_flops it re-derives max_steps), so it trains on a copy.
    key, config = config_hash(run.cfg), run.cfg.to_dict()
    trainer = Trainer(copy.deepcopy(run.cfg), log=lambda *a, **k: None, overwrite=True)  # replaces a crashed attempt
    t0 = time.perf_counter()
    summary = trainer.run()
    wall = time.perf_counter() - t0
    final, se = full_validation(trainer)
    curve = [[h["flops"], h["tokens"], h.get("seconds"), h["val_loss"]] for h in trainer.history
             if h["event"] == "eval"]
    events = [growth_event_record(h) for h in trainer.history if h["event"] == "grow"]
    # Each stage's last evaluation, at the validation length and (a shorter stage) at its own sequence length.
    stages = [{k: st.get(k) for k in ("stage", "start_step", "seq_len", "shape", "val_loss", "val_loss_stage_len")}
              for st in trainer.stage_stats.rows]
    shutil.rmtree(run.cfg.train.out_dir, ignore_errors=True)  # checkpoints of a finished study run are not kept
    return {
        "study": study.name, "arm": run.arm, "seed": run.seed, "lr": run.lr, "scale": run.scale,
        "config_hash": key, "config": config, "commit": git_commit(),
        "curve": curve, "growth_events": events, "stages": stages, "final_loss": final, "final_loss_se": se,
        "final_curve_loss": summary["val_loss"], "flops": summary["flops"], "tokens": summary["tokens"],
        "steps": summary["steps"], "wall_seconds": wall, "machine": machine(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def growth_event_record(h: dict) -> dict:
    """What a store keeps of a growth event: when, the operator, the loss before and after, and a LAG
    selection's outcome (candidates, winner, each candidate's steps, FLOPs, last loss and its standard error, and that of the winner's difference
    from the runner-up)."""
    plan = h.get("plan") or {}
    out = {k: h.get(k) for k in ("step", "tokens", "flops", "val_loss_before", "val_loss_after", "seconds",
                                  "params_before", "params_after")}
    out.update(op=plan.get("op"), options=plan.get("options"))
    lag = h.get("lag")
    if lag:
        out["lag"] = {"strategy": lag.get("strategy", "all"), "candidates": lag["candidates"],
                      "winner": lag["winner"], "steps_per_candidate": lag.get("steps_per_candidate"),
                      "flops_per_candidate": lag["flops_per_candidate"],
                      "last_losses": [c[-1] if c else None for c in lag["curves"]],
                      "last_se": [s[-1] if s else None for s in lag.get("eval_se", [])],
                      "paired_se": lag.get("paired_se")}
    return out


@torch.no_grad()
def full_validation(trainer) -> tuple[float, float]:
    """Final loss on up to 480 validation sequences (15 batches of 32; fewer where the split is smaller) and its
    standard error over the batches."""
    from ..config import eval_seq_len
    from ..data import ShardSet, val_batches
    from ..parallel import unwrap

    seq = eval_seq_len(trainer.cfg)
    n = min(FULL_VAL_BATCHES, (ShardSet(trainer.cfg.data.dir, "val").total - 1) // (FULL_VAL_BATCH * seq))
    model = unwrap(trainer.model)
    model.eval()
    losses = []
    for x, y in val_batches(trainer.cfg.data.dir, seq, FULL_VAL_BATCH, n, vocab_size=trainer.model_config.vocab_size):
        losses.append(float(model(x.to(trainer.device), y.to(trainer.device))))
    model.train()
    return statistics.fmean(losses), statistics.stdev(losses) / len(losses) ** 0.5


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "nanogrow"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    cpu = platform.processor()  # often empty on Linux; /proc/cpuinfo names the model where it exists
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = cpu or "unknown"  # not Linux, or no model name: keep what platform reports
    return {"cores": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}
