"""Validation, once, before any compute: every key's range, every stage's plan built (a pure computation), and
what train.parallel cannot do asked of the backends' own table (``parallel.support``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

from ..grow import make_plan
from ..model import ModelConfig
from ..parallel.support import PACKAGES, refusal
from ..triggers import TRIGGERS, make_trigger
from .resolve import eval_seq_len
from .schema import CHOICES, ConfigError, LagConfig, RunConfig, StageConfig


def validate(cfg: RunConfig, source: str = "config") -> None:
    try:
        cfg.model.validate("model")
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    t, dcfg = cfg.train, cfg.data
    for key, allowed in CHOICES.items():
        if allowed is None:
            continue
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{source}: {key}={value!r} is not one of {', '.join(map(repr, allowed))}")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"{source}: train.device={t.device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
    positive = {"train.micro_batch": t.micro_batch, "train.grad_accum": t.grad_accum,
                "train.max_steps": t.max_steps, "train.eval_batches": t.eval_batches,
                "train.eval_batch_size": t.eval_batch_size, "train.log_every": t.log_every,
                "train.keep_last": t.keep_last, "data.seq_len": dcfg.seq_len, "train.lr": t.lr,
                "train.replicate": t.replicate}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{source}: {key} must be > 0, got {value!r}")
    non_negative = {"train.warmup_steps": t.warmup_steps, "train.weight_decay": t.weight_decay,
                    "train.grad_clip": t.grad_clip, "train.eval_every": t.eval_every,
                    "train.ckpt_every": t.ckpt_every, "train.eps": t.eps,
                    "train.skip_nonfinite_steps": t.skip_nonfinite_steps, "data.eval_seq_len": dcfg.eval_seq_len}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{source}: {key} must be >= 0, got {value!r}")
    for key, value in {"train.beta1": t.beta1, "train.beta2": t.beta2}.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{source}: {key} must be in [0, 1), got {value!r}")
    for key, value in {"train.min_lr_ratio": t.min_lr_ratio, "train.decay_frac": t.decay_frac}.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{source}: {key} must be in [0, 1], got {value!r}")
    if t.max_flops < 0 or (t.max_flops and cfg.growth.schedule != "manual"):
        raise ConfigError(f"{source}: train.max_flops={t.max_flops} must be >= 0, and > 0 only with "
                          f"growth.schedule='manual' (a budgeted schedule places its stages from train.max_steps)")
    if t.global_batch < 0:
        raise ConfigError(f"{source}: train.global_batch must be >= 0 (0: world x micro_batch x grad_accum), got "
                          f"{t.global_batch}")
    for mb in sorted({t.micro_batch} | {st.micro_batch for st in cfg.stage if st.micro_batch > 0}):
        if t.global_batch and t.global_batch % mb:
            raise ConfigError(f"{source}: train.global_batch={t.global_batch} is not a multiple of the micro-batch "
                              f"{mb} (train.micro_batch or a stage's micro_batch)")
    for key, package in (("train.tensorboard", "tensorboard"), ("train.wandb", "wandb")):
        if getattr(t, key.split(".")[1]) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{source}: {key}=true needs the {package} package, which is not installed (pip "
                              f"install {package}, or the nanogrow extra: pip install 'nanogrow[{package}]')")
    if dcfg.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"{source}: data.seq_len={dcfg.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    validate_stages(cfg, source)
    validate_parallel(cfg, source)


def validate_parallel(cfg: RunConfig, source: str) -> None:
    """What train.parallel cannot do, refused before compute. The limits are the backends' own
    (``parallel.support``): this asks them about every feature the config uses (``features_asked``) and holds no
    rule of any backend."""
    t = cfg.train
    if t.zero_stage not in (1, 2, 3):
        raise ConfigError(f"{source}: train.zero_stage={t.zero_stage!r} is not one of 1, 2, 3")
    if t.parallel in PACKAGES and importlib.util.find_spec(PACKAGES[t.parallel][0]) is None:
        package, how = PACKAGES[t.parallel]
        raise ConfigError(f"{source}: train.parallel={t.parallel!r} needs the {package} package ({how})")
    for feature, asked_by, instead in features_asked(cfg):
        why = refusal(t.parallel, feature, asked_by, instead)
        if why:
            raise ConfigError(f"{source}: {why}")


def features_asked(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """(backend feature, the option that needs it, an alternative to that option) for what ``cfg`` uses."""
    t, g = cfg.train, cfg.growth
    asked = [("replicate", f"train.replicate={t.replicate}", "train.replicate=1")] if t.replicate != 1 else []
    if cfg.stage:
        per_element = [k for k, on in (("growth.lr_adapt='vt'", g.lr_adapt == "vt"),
                                       ("growth.new_lr_mult", g.new_lr_mult != 1.0),
                                       ("growth.new_wd_steps", g.new_wd_steps > 0)) if on]
        asked += [("per-element-lr", key, "") for key in per_element]
    for i, st in enumerate(cfg.stage, start=1):
        if (st.optimizer or g.optimizer) == "map+age":
            key = f"stage[{i}].optimizer" if st.optimizer else "growth.optimizer"
            asked.append(("optimizer-ages", f"{key}='map+age'", "'map' (moments mapped, step count kept) or 'reset'"))
        if st.lag:
            asked.append(("lag", f"stage[{i}].lag", ""))
        if (st.op or g.op) == "learned":
            key = f"stage[{i}].op" if st.op else "growth.op"
            asked.append(("learned-growth", f"{key}='learned'", "its init operator (e.g. 'stack')"))
        if st.trigger != "schedule":
            asked += [(signal, f"stage[{i}].trigger={st.trigger!r}", "another trigger")
                      for signal in sorted(TRIGGERS[st.trigger].signals)]
    return asked


def _check_lag(lag: dict, old: ModelConfig, new: ModelConfig, seed: int, key: str) -> None:
    lc = LagConfig.from_dict(lag, key)
    lc.check(key)
    for j, c in enumerate(lc.candidate_list(old, new)):
        try:
            make_plan(c.op, old, new, seed=seed, **c.options)
        except ValueError as e:
            raise ValueError(f"{key}.candidates[{j}] ({c.name()}): {e}") from None


def validate_stages(cfg: RunConfig, source: str) -> None:
    """Shapes, operators and options of every stage are checked by building every growth plan (a pure
    computation: no tensor is touched), so a bad stage fails now and not hours into the run."""
    g = cfg.growth
    if g.rewarm_steps < 0 or not 0.0 <= g.rewarm_start <= 1.0 or g.exp_ratio <= 0:
        raise ConfigError(f"{source}: growth.rewarm_steps must be >= 0, growth.rewarm_start in [0, 1], "
                          f"growth.exp_ratio > 0; got {g.rewarm_steps}, {g.rewarm_start}, {g.exp_ratio}")
    if not (math.isfinite(g.new_lr_mult) and g.new_lr_mult > 0) or g.new_wd_steps < 0:
        raise ConfigError(f"{source}: growth.new_lr_mult must be > 0 and growth.new_wd_steps >= 0; got "
                          f"{g.new_lr_mult}, {g.new_wd_steps}")
    per_element = [k for k, on in (("growth.new_lr_mult", g.new_lr_mult != 1.0),
                                   ("growth.new_wd_steps", g.new_wd_steps > 0)) if on]
    if per_element and cfg.stage:
        for i, st in enumerate(cfg.stage, start=1):
            if (st.optimizer or g.optimizer) == "reset":
                raise ConfigError(f"{source}: {', '.join(per_element)} needs mapped optimizer state, but stage[{i}] "
                                  f"uses optimizer 'reset'; use 'map' or 'map+age'")
    if g.lr_policy == "rewarm" and g.rewarm_steps == 0 and cfg.stage:
        raise ConfigError(f"{source}: growth.lr_policy='rewarm' needs growth.rewarm_steps > 0")
    shape = cfg.model
    seq_len, micro_batch, seq_lens = cfg.data.seq_len, cfg.train.micro_batch, [cfg.data.seq_len]
    fields_ = set(ModelConfig.field_names()) - {"kernels"}  # an implementation choice, not a shape
    for i, st in enumerate(cfg.stage, start=1):
        key = f"stage[{i}]"
        for k in st.shape:
            if k not in fields_:
                raise ConfigError(f"{source}: {key}.shape has unknown key {k!r}; allowed: {', '.join(sorted(fields_))}")
        for name in ("optimizer", "lr_policy"):
            value, allowed = getattr(st, name), CHOICES[f"growth.{name}"] or ()
            if value and value not in allowed:
                raise ConfigError(f"{source}: {key}.{name}={value!r} is not one of {', '.join(map(repr, allowed))}")
        whens = [w for w in ("at_step", "at_tokens", "at_flops") if getattr(st, w) >= 0]
        if st.trigger != "schedule":
            if whens:
                raise ConfigError(f"{source}: {key}.{whens[0]} is set but {key}.trigger={st.trigger!r} decides "
                                  f"when to grow (bound the stage with trigger_options min_steps / max_steps)")
            try:
                make_trigger(st.trigger, **st.trigger_options)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{source}: {key}.trigger: {e}") from None
        elif st.trigger_options and set(st.trigger_options) - {"min_steps", "max_steps"}:
            raise ConfigError(f"{source}: {key}.trigger_options {sorted(st.trigger_options)}: the schedule trigger "
                              f"takes only min_steps / max_steps")
        elif g.schedule == "manual" and len(whens) != 1:
            raise ConfigError(f"{source}: {key} needs exactly one of at_step, at_tokens, at_flops with "
                              f"growth.schedule='manual' (got {whens or 'none'})")
        if g.schedule != "manual" and whens:
            raise ConfigError(f"{source}: {key}.{whens[0]} is set but growth.schedule={g.schedule!r} places the "
                              f"stages itself; use growth.schedule='manual' or drop {whens[0]}")
        if st.micro_batch < 0 or st.lr < 0 or st.seq_len < 0:
            raise ConfigError(f"{source}: {key}.micro_batch, {key}.lr and {key}.seq_len must be >= 0")
        try:
            new = ModelConfig(**{**dataclasses.asdict(shape), **st.shape})
            new.validate(f"{key}.shape")
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{source}: {key}: {e}") from None
        seq_len, micro_batch = _check_stage_context(st, key, shape, new, seq_len, micro_batch, source)
        # The growth plan maps parameters; the context length is not one (only RoPE tables depend on it).
        param_new = dataclasses.replace(new, max_seq_len=shape.max_seq_len)
        if changes_parameters(shape, param_new):
            try:
                if st.lag:
                    _check_lag(st.lag, shape, param_new, g.seed + i, f"{key}.lag")
                else:
                    make_plan(st.op or g.op, shape, param_new, seed=g.seed + i, **st.options)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{source}: {key} (op {st.op or g.op!r}): {e}") from None
        else:
            given = [k for k, v in (("op", st.op), ("options", st.options), ("lag", st.lag)) if v]
            if given:
                raise ConfigError(f"{source}: {key} changes no parameter shape, so {key}.{given[0]} has nothing to "
                                  f"grow; drop it (a stage that only changes seq_len / micro_batch applies no plan)")
        shape = new
        seq_lens.append(seq_len)
    _check_eval_seq_len(cfg, max(seq_lens), source)
    block = cfg.data.shuffle_block
    if block < 0 or (block and any(block % n for n in seq_lens)):
        raise ConfigError(f"{source}: data.shuffle_block={block} must be 0 or a multiple of every seq_len the run "
                          f"trains at ({sorted(set(seq_lens))}), so that no window straddles two blocks")
    for w in ("at_step", "at_tokens", "at_flops"):
        marks = [getattr(st, w) for st in cfg.stage]
        if g.schedule == "manual" and min(marks, default=0) >= 0 and marks != sorted(set(marks)):
            raise ConfigError(f"{source}: stage {w} values must strictly increase, got {marks}")


# ---- sequence-length stages -------------------------------------------------------------------------------------


def changes_parameters(old: ModelConfig, new: ModelConfig) -> bool:
    """Does old -> new change any parameter (shape or init-relevant field)? ``max_seq_len`` is not compared: no
    parameter depends on it."""
    return dataclasses.replace(old.resolved(), max_seq_len=0) != dataclasses.replace(new.resolved(), max_seq_len=0)


def _check_stage_context(st: StageConfig, key: str, old: ModelConfig, new: ModelConfig, seq_len: int,
                         micro_batch: int, source: str) -> tuple[int, int]:
    """A stage's context: max_seq_len never shrinks, the training seq_len fits the model after the stage, and
    the stage changes something. Returns the (seq_len, micro_batch) the stage trains at."""
    if new.max_seq_len < old.max_seq_len:
        raise ConfigError(f"{source}: {key}.shape.max_seq_len={new.max_seq_len} is below the model's "
                          f"max_seq_len={old.max_seq_len} before the stage; the context can only grow (train at a "
                          f"shorter length with {key}.seq_len instead)")
    new_seq = st.seq_len or seq_len
    if new_seq > new.max_seq_len:
        what = f"{key}.seq_len={new_seq}" if st.seq_len else f"the training seq_len {new_seq} (from earlier stages)"
        raise ConfigError(f"{source}: {what} exceeds the model's max_seq_len={new.max_seq_len} after {key}; raise it "
                          f"in the same stage with {key}.shape = {{ max_seq_len = {new_seq} }} (only the RoPE "
                          f"tables depend on it) or start with a larger model.max_seq_len")
    new_mb = st.micro_batch or micro_batch
    if (new_seq, new_mb, new.max_seq_len) == (seq_len, micro_batch, old.max_seq_len) and \
            not changes_parameters(old, new):
        raise ConfigError(f"{source}: {key} changes nothing: give it a shape, seq_len or micro_batch that differs "
                          f"from the stage before (shape {old.n_layer} x {old.d_model}, seq_len {seq_len}, "
                          f"micro_batch {micro_batch})")
    return new_seq, new_mb


def _check_eval_seq_len(cfg: RunConfig, longest: int, source: str) -> None:
    """Validation runs at one length from the first step to the last, so the first model must accept it."""
    e, m = eval_seq_len(cfg, longest), cfg.model.max_seq_len
    if e <= m:
        return
    if cfg.data.eval_seq_len:
        raise ConfigError(f"{source}: data.eval_seq_len={e} exceeds model.max_seq_len={m}: validation runs from the "
                          f"first step, so the starting model must accept it")
    raise ConfigError(f"{source}: the validation seq_len (data.eval_seq_len=0: the run's longest training seq_len, "
                      f"{e}) exceeds model.max_seq_len={m} of the starting model; set model.max_seq_len = {e} "
                      f"(RoPE tables only) so that every stage is evaluated at the same length, or set "
                      f"data.eval_seq_len <= {m}")
