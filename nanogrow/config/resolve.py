"""What a validated config resolves to for the run: its stages with the growth defaults filled in, the batch
layout (gradient accumulation from a global batch), the parallelism for a world size, the validation length, and the
notes a launcher or a shortened run makes to the config."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .schema import ConfigError, LagConfig, RunConfig, TrainConfig


@dataclass
class Stage:
    """Stage ``index`` (>= 1) with every value resolved from the growth defaults once (``resolve_stages``):
    nothing downstream asks "the stage's value or the default?"."""

    index: int
    shape: dict
    op: str
    options: dict
    optimizer: str  # the optimizer-state policy at this growth event
    lr_policy: str  # after a growth event that changes parameters
    rewarm_without_growth: bool  # a plan-free stage re-warms only when the stage itself asks for it
    seed: int  # growth.seed + index: the randomness of this event's fresh pieces
    micro_batch: int
    seq_len: int
    lr: float
    at_step: int
    at_tokens: int
    at_flops: float
    trigger: str
    trigger_options: dict
    lag: LagConfig | None


def resolve_stages(cfg: RunConfig) -> list[Stage]:
    """Every [[stage]] of ``cfg`` with its growth defaults filled in (``cfg`` validated)."""
    g, out = cfg.growth, []
    for i, st in enumerate(cfg.stage, start=1):
        out.append(Stage(index=i, shape=dict(st.shape), op=st.op or g.op, options=dict(st.options),
                         optimizer=st.optimizer or g.optimizer, lr_policy=st.lr_policy or g.lr_policy,
                         rewarm_without_growth=bool(st.lr_policy) and st.lr_policy != "continue",
                         seed=g.seed + i, micro_batch=st.micro_batch, seq_len=st.seq_len, lr=st.lr,
                         at_step=st.at_step, at_tokens=st.at_tokens, at_flops=st.at_flops, trigger=st.trigger,
                         trigger_options=dict(st.trigger_options),
                         lag=LagConfig.from_dict(st.lag) if st.lag else None))
    return out


def from_accelerate(t: TrainConfig, env: Mapping[str, str] | None = None) -> str | None:
    """``accelerate launch`` is a launcher for nanogrow (it sets torchrun's environment), not a wrapper. Its
    DeepSpeed forms (``--use_deepspeed --zero_stage N`` or ``--deepspeed_config_file F``) also say which ZeRO
    stage to run: with train.parallel = "auto" the run takes it (zero_optimization.stage of the file), and nanogrow
    builds its own DeepSpeed config from the train.* keys. Returns the note to log, or None."""

    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    stage, source = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"), "--zero_stage"
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if stage in (None, "None") and path and path != "None":
        try:
            stage = json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage")
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"DeepSpeed config file {path!r} (accelerate --deepspeed_config_file): cannot read "
                              f"zero_optimization.stage: {e}") from None
        source = f"{path}: zero_optimization.stage"
    if t.parallel not in ("auto", "deepspeed"):
        return (f"note: launched by accelerate with DeepSpeed, but train.parallel={t.parallel!r} in the config; "
                f"the config wins")
    t.parallel = "deepspeed"
    if stage not in (None, "None"):
        t.zero_stage = int(stage)
    return (f"note: launched by `accelerate launch` with DeepSpeed: train.parallel='deepspeed', train.zero_stage="
            f"{t.zero_stage}{f' (from {source})' if stage not in (None, 'None') else ''}; the DeepSpeed config is "
            f"nanogrow's own, built from the train.* keys")


def fit_warmup(t: TrainConfig) -> str | None:
    """A run shortened below its warm-up (``--set train.max_steps=40`` on a config with 50 warm-up steps) keeps
    the warm-up's share of the run rather than failing: warmup_steps becomes max_steps // 10. Returns the note to
    log, or None when nothing changed."""
    if t.warmup_steps < t.max_steps or t.schedule == "constant":
        return None
    old, t.warmup_steps = t.warmup_steps, t.max_steps // 10
    return (f"note: train.warmup_steps={old} is not below train.max_steps={t.max_steps}; warming up over "
            f"{t.warmup_steps} steps (max_steps // 10) instead")


def check_global_batch(cfg: RunConfig, world: int) -> None:
    """train.global_batch must split into world x micro_batch x grad_accum for every stage's micro-batch."""
    t = cfg.train
    if not t.global_batch:
        return
    for mb in sorted({t.micro_batch} | {st.micro_batch for st in cfg.stage if st.micro_batch}):
        if t.global_batch % (world * mb):
            raise ConfigError(f"train.global_batch={t.global_batch} cannot be met with world size "
                              f"{world} x micro_batch {mb}: it must be a multiple of their product "
                              f"{world * mb} (sequences per optimizer step = world x micro_batch x "
                              f"grad_accum)")


def grad_accum(t: TrainConfig, world: int, micro_batch: int) -> int:
    """Micro-steps per optimizer step: derived from train.global_batch (sequences over all ranks) when set."""
    if not t.global_batch:
        return t.grad_accum
    return t.global_batch // (world * micro_batch)


def parallel_mode(t: TrainConfig, world: int) -> str:
    """train.parallel for a run of ``world`` processes ("auto": ddp with more than one)."""
    if world == 1:
        return "none"  # one process: nothing to shard or replicate
    return t.parallel if t.parallel != "auto" else "ddp"


def eval_seq_len(cfg: RunConfig, longest: int | None = None) -> int:
    """The validation sequence length of the run: ``data.eval_seq_len``, or (0) the longest training seq_len of
    any stage, so that validation losses of all stages (and of runs with other seq_len schedules reaching the
    same final length) are measured on the same windows and stay comparable."""
    if cfg.data.eval_seq_len:
        return cfg.data.eval_seq_len
    return longest if longest is not None else max([cfg.data.seq_len] + [st.seq_len for st in cfg.stage])
