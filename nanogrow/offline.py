"""Work on checkpoints outside a training run: load a checkpoint's model (and optimizer), ``consolidate`` any
checkpoint (DeepSpeed ZeRO included) into a weights-only DCP one, and ``grow_checkpoint`` (offline growth).

Sits on ``nanogrow.checkpoint`` (formats, atomic writes) and the growth layer; the trainer, the CLI and the
Hugging Face converters use it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, read_meta, save_checkpoint
from .config import RunConfig
from .grow import AdamW, grow, make_optimizer, make_plan
from .model import ModelConfig, Transformer


def load_model(path: str | Path, with_optimizer: bool = False,
               kernels: str | None = None) -> tuple[Transformer, AdamW | None, dict]:
    """The model of a checkpoint (fp32, CPU, growth masks as saved), its optimizer (``with_optimizer``: nanogrow's
    AdamW with the run's hyper-parameters and saved state, ages included) and its meta; no RNG restore. Built on
    the meta device and filled by DCP, so no time is spent on an initialisation that is overwritten. ``kernels``
    overrides the saved ``model.kernels`` (``"torch"``: the reference ops, which run anywhere)."""
    meta = read_meta(path)
    cfg = ModelConfig(**meta["model_config"])
    if kernels is not None:
        cfg = dataclasses.replace(cfg, kernels=kernels)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    optimizer = None
    if with_optimizer:
        train = RunConfig.from_dict(meta["run_config"], source=str(path)).train
        optimizer = make_optimizer(model, train, ages=meta.get("optimizer_ages", False))
    load_checkpoint(path, model, optimizer, load_rng=False)
    model.reset_rope()
    return model, optimizer, meta


def consolidate(path: str | Path, out_dir: str | Path, log=print) -> Path:
    """Write a weights-only DCP checkpoint of ``path`` (DeepSpeed or any other) into ``out_dir``, same step: the
    fp32 weights and masks, a fresh optimizer (step-0 state), and the meta that lets training continue (data
    position, lr schedule, stage, growth history)."""
    src = Path(path)
    model, _, meta = load_model(src)
    cfg = model.config
    optimizer = make_optimizer(model, RunConfig.from_dict(meta["run_config"], source=str(src)).train)
    optimizer.init_state()
    out_meta = {k: v for k, v in meta.items() if k not in ("format", "zero_stage", "format_version", "step",
                                                            "world_size")}
    out_meta["optimizer_ages"] = False
    out_meta["history"] = meta.get("history", []) + [{
        "event": "consolidate", "step": meta["step"], "source": str(src.resolve()),
        "world_size": meta.get("world_size"), "format": meta.get("format", "dcp"), "optimizer": "reset"}]
    saved = save_checkpoint(out_dir, meta["step"], model, optimizer, out_meta, keep_last=10**6)
    log(f"consolidated {src} (step {meta['step']}, {cfg.num_params():,} params, world size "
        f"{meta.get('world_size')}) into the weights-only checkpoint {saved}")
    return saved


def grow_checkpoint(path: str | Path, to: dict, op: str, out_dir: str | Path, options: dict | None = None,
                    policy: str = "map+age", seed: int = 0, log=print) -> Path:
    """Grow a saved checkpoint offline (weights and optimizer state) and write it as a checkpoint in ``out_dir``,
    with the event appended to its growth history. Training resumes from it with ``--resume``."""
    meta = read_meta(path)
    old_cfg = ModelConfig(**meta["model_config"]).resolved()
    new_cfg = dataclasses.replace(old_cfg, **to).resolved()
    plan = make_plan(op, old_cfg, new_cfg, seed=seed, **(options or {}))  # every bad input fails here
    if op == "learned" and plan.options["steps"] > 0:
        raise ValueError("the learned operator fits its maps on training batches inside a run (a [[stage]] with "
                         "op = 'learned'); offline growth has no data: use options steps=0 (its initial maps, the "
                         "plain operator) or grow inside the run")
    model, optimizer, _ = load_model(path, with_optimizer=True)
    if meta.get("ramp"):
        raise ValueError(f"checkpoint {str(path)!r} is in the middle of a fade-in; train past it before growing")
    t0 = time.perf_counter()
    model, optimizer = grow(model, optimizer, plan, policy=policy, device="cpu")
    meta = dict(meta, model_config=dataclasses.asdict(new_cfg), optimizer_ages=bool(optimizer.track_ages))
    ramp = plan.mask_ramp(meta["step"])
    if ramp is not None:
        ramp.apply(model, meta["step"])
    meta["ramp"] = ramp.to_dict() if ramp is not None else None
    meta["history"] = meta.get("history", []) + [{
        "event": "grow", "offline": True, "step": meta["step"], "tokens": meta["meter"]["total_tokens"],
        "flops": meta["meter"]["total_flops"], "plan": plan.to_dict(), "optimizer": policy,
        "params_before": old_cfg.num_params(), "params_after": new_cfg.num_params(),
        "seconds": time.perf_counter() - t0}]
    if meta.get("stage_stats"):  # the steps from here train the grown model: a statistics row of its own
        c = new_cfg
        meta["stage_stats"] = meta["stage_stats"] + [dict(
            meta["stage_stats"][-1], start_step=meta["step"], params=c.num_params(), offline=True, resumed=False,
            shape=f"{c.n_layer} x {c.d_model}, {c.d_ff}, {c.n_head}/{c.n_kv_head}",  # as nanogrow.train writes it
            steps=0, tokens=0, flops=0.0, seconds=0.0, val_loss=None)]
    for key in ("format_version", "step", "world_size"):
        meta.pop(key, None)
    saved = save_checkpoint(out_dir, read_meta(path)["step"], model, optimizer, meta, keep_last=10**6)
    log(f"grew {path} with {op}: {old_cfg.num_params():,} -> {new_cfg.num_params():,} params; wrote {saved}")
    return saved
