"""Run configuration: typed dataclasses with defaults, loaded from TOML, overridden by ``--set key=value``, and
validated once, before any compute, with errors that name the key at fault and the values it allows."""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import tomllib

from .frozen import Freezable
from .grow import make_plan
from .lag import STRATEGIES, Candidate, default_candidates
from .model import ModelConfig
from .parallel.support import PACKAGES, refusal
from .triggers import TRIGGERS, make_trigger


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file) at fault."""


@dataclass
class DataConfig(Freezable):
    dir: str = "data/demo"  # shards written by `nanogrow prep`
    seq_len: int = 256  # training context length (<= model.max_seq_len)
    seed: int = 0  # data order (shard permutation per epoch)
    eval_seq_len: int = 0  # validation sequence length, fixed for the whole run; 0 = the longest training seq_len
    shuffle_block: int = 0  # tokens; > 0: read each epoch in blocks of this size in a permuted order (a multiple of
    #                         every seq_len); 0: each shard in order, only the shard order permuted


@dataclass
class TrainConfig(Freezable):
    out_dir: str = "runs/demo"  # checkpoints, train.log, metrics.jsonl, summary.json, loss.png (tb/ for TensorBoard)
    seed: int = 0  # model init and any other randomness
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    micro_batch: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step (derived from global_batch when that is set)
    global_batch: int = 0  # sequences per optimizer step over all ranks; > 0: grad_accum = global_batch / (world x
    #                        micro_batch), re-derived at every start, resume and stage, so the batch survives a change
    #                        of world size (0: world x micro_batch x grad_accum, whatever the world)
    max_steps: int = 200  # optimizer steps of the whole run (stages starting at or after it never run: a warning)
    max_flops: float = 0.0  # > 0: a budget of charged FLOPs (metrics.CHARGED: training, LAG selection, trigger
    #                         probes, learned fitting; not evaluation). The run stops once it is spent; max_steps is
    #                         re-derived from the FLOPs left at the start and after every growth, each stage whose
    #                         start step is known at its own cost per step (so the lr schedule ends with the budget
    #                         wherever a trigger puts the growth, and before a growth it is the step-planned one)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 20  # linear lr warm-up; >= max_steps: max_steps // 10 instead, with a note
    schedule: str = "cosine"  # cosine | wsd (warm-up, stable, decay) | constant
    decay_frac: float = 0.2  # wsd: fraction of the run spent decaying
    weight_decay: float = 0.1  # AdamW, on matrices only (norm gains are not decayed)
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    eps: float = 1e-8  # AdamW
    grad_clip: float = 1.0  # 0 disables clipping
    skip_nonfinite_steps: int = 0  # non-finite loss/gradient steps skipped in a row before the run stops
    eval_every: int = 50  # steps; 0 disables periodic evaluation
    eval_batches: int = 4  # validation batches per evaluation (the same batches every time)
    eval_batch_size: int = 8  # sequences per validation batch
    log_every: int = 10  # steps between log lines and metrics.jsonl records
    ckpt_every: int = 0  # steps; 0 = only at the end (and at growth events)
    keep_last: int = 2  # checkpoints kept on disk
    parallel: str = "auto"  # auto (ddp under torchrun, else none) | none | ddp | fsdp | deepspeed
    zero_stage: int = 1  # deepspeed: ZeRO stage 1 (optimizer state) | 2 (+ gradients) | 3 (+ parameters) sharded
    replicate: int = 1  # fsdp: replicate degree > 1 gives HSDP (shard within groups, replicate across)
    compile: bool = False  # torch.compile the model
    wandb: bool = False  # log metrics to wandb (the `wandb` extra; missing package: an error at start)
    wandb_project: str = "nanogrow"  # wandb project
    run_name: str = ""  # the run's name in wandb ("" = the last part of out_dir)
    tensorboard: bool = False  # log metrics to TensorBoard in out_dir/tb (the `tensorboard` extra)
    plot: bool = True  # write out_dir/loss.png at the end of the run (needs matplotlib; skipped with a note if absent)


@dataclass
class GrowthConfig(Freezable):
    """Defaults for every growth event, and how stage boundaries are placed when stages do not give them."""

    schedule: str = "manual"  # manual (each [[stage]] says at_*) | equal-tokens | equal-flops | exponential
    exp_ratio: float = 2.0  # exponential: each stage gets this many times the tokens of the previous one
    op: str = "stack"  # default operator
    optimizer: str = "map+age"  # reset | map | map+age: what happens to Adam's moments at growth
    lr_policy: str = "rewarm"  # continue | rewarm | rewind
    rewarm_steps: int = 20  # rewarm / rewind: linear ramp length after each growth
    rewarm_start: float = 0.1  # the ramp starts at this fraction of the scheduled lr
    lr_adapt: str = "none"  # none | vt (Variance-Transfer stage-wise lr scaling of new sub-networks)
    new_lr_mult: float = 1.0  # learning-rate multiplier of the new elements (fresh ones and repeated copies)
    new_wd_steps: int = 0  # > 0: the new elements get no weight decay for this many steps after each growth
    seed: int = 0  # randomness of fresh pieces; stage i uses seed + i
    eval_at_growth: bool = True  # validation loss just before and after each growth event


@dataclass
class StageConfig(Freezable):
    """One growth event and the stage that follows it. Stage 0 is [model]; stage i >= 1 is the i-th [[stage]]."""

    shape: dict = field(default_factory=dict)  # ModelConfig fields that change, e.g. { n_layer = 8 }
    op: str = ""  # operator; "" = growth.op
    options: dict = field(default_factory=dict)  # operator options
    at_step: int = -1  # when the event fires (manual schedule): first step of this stage,
    at_tokens: int = -1  # ... or the token count,
    at_flops: float = -1.0  # ... or the FLOP count at which it fires
    micro_batch: int = 0  # 0 = unchanged; small early stages can fill the device with larger batches
    seq_len: int = 0  # 0 = unchanged; training sequence length from this stage on (<= max_seq_len after it)
    lr: float = 0.0  # 0 = train.lr; otherwise this stage's peak lr (scales the whole schedule)
    optimizer: str = ""  # "" = growth.optimizer
    lr_policy: str = ""  # "" = growth.lr_policy
    trigger: str = "schedule"  # schedule (at_* or the growth.schedule) | plateau | gradient | scaling-law | curvature
    trigger_options: dict = field(default_factory=dict)  # e.g. { window = 50, threshold = 0.05, min_steps = 100 }
    lag: dict = field(default_factory=dict)  # LAG: { candidates = "design-space" | [{op, options}], steps = k,
    #                                            strategy = "all" | "halving" (successive halving, same budget),
    #                                            eval_every = 1, score_batches = 4 (held-out training
    #                                            micro-batches the candidates are scored on), groups = 1 (process
    #                                            groups training candidates at once; must divide the world) }


@dataclass
class RunConfig(Freezable):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    stage: list[StageConfig] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "RunConfig":
        return _build(cls, d, prefix="", source=source)

    def validate(self) -> None:
        validate(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "growth": GrowthConfig}

CHOICES = {
    "train.device": None,  # free-form, checked below
    "train.dtype": ("auto", "fp32", "bf16"),
    "train.schedule": ("cosine", "wsd", "constant"),
    "train.parallel": ("auto", "none", "ddp", "fsdp", "deepspeed"),
    "growth.schedule": ("manual", "equal-tokens", "equal-flops", "exponential"),
    "growth.optimizer": ("reset", "map", "map+age"),
    "growth.lr_policy": ("continue", "rewarm", "rewind"),
    "growth.lr_adapt": ("none", "vt"),
}


def _check_type(value: Any, typ: Any, key: str, source: str) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if typ is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if typ is float and not isinstance(value, float):
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if typ is str and not isinstance(value, str):
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
    return value


def _build(cls, d: dict, prefix: str, source: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a table, got {d!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        full = f"{prefix}{key}"
        if key not in names:
            where = f" in [{prefix.rstrip('.')}]" if prefix else ""
            raise ConfigError(f"{source}: unknown key {full!r}; allowed keys{where}: {', '.join(names)}")
        typ = hints[key]
        if key == "stage" and cls is RunConfig:
            if not isinstance(value, list):
                raise ConfigError(f"{source}: stage must be an array of tables ([[stage]]), got {value!r}")
            kwargs[key] = [_build(StageConfig, v, f"stage[{i + 1}].", source) for i, v in enumerate(value)]
        elif typ is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {full} must be a table, got {value!r}")
            kwargs[key] = value
        elif dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, f"{full}.", source)
        else:
            kwargs[key] = _check_type(value, typ, full, source)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """A --set value: TOML-ish literals (ints, floats, true/false, quoted or bare strings)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to a raw config dict (before typing, so errors name the key)."""
    d = copy.deepcopy(d)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] == "stage":
            _set_stage_key(d, parts, _parse_value(value), item)
            continue
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise ConfigError(f"--set {item!r}: key must be one of {', '.join(s + '.<key>' for s in SECTIONS)} "
                              f"or stage.N.<key> (N = 1 for the first [[stage]])")
        d.setdefault(parts[0], {})[parts[1]] = _parse_value(value)
    return d


def _set_stage_key(d: dict, parts: list[str], value: Any, item: str) -> None:
    """``stage.N.key=value`` (``stage.N.shape.n_layer=8`` for a key inside a table): N counts the [[stage]] tables
    from 1, as error messages and the stage table do (stage 0 is the starting [model]); N = one past the last adds
    a stage. Setting one of at_step / at_tokens / at_flops drops the stage's other two."""
    stages = d.setdefault("stage", [])
    count = len(stages) if isinstance(stages, list) else 0
    if len(parts) < 3 or not parts[1].isdigit() or not isinstance(stages, list):
        raise ConfigError(f"--set {item!r}: expected stage.N.key=value with N a [[stage]] number (1..{count})")
    n = int(parts[1])
    if n == 0:
        raise ConfigError(f"--set {item!r}: stage 0 is the starting model ([model], --set model.<key>=...); the "
                          f"[[stage]] tables are stage.1 .. stage.{count}")
    if n > count + 1:
        raise ConfigError(f"--set {item!r}: the config has {count} [[stage]] table(s) (stage.1 .. stage.{count}); "
                          f"stage.{count + 1} adds one")
    if n == count + 1:
        stages.append({})
    target = stages[n - 1]
    for p in parts[2:-1]:
        target = target.setdefault(p, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {item!r}: stage.{n}.{p} is not a table")
    if parts[-1] in _WHENS and len(parts) == 3:
        for other in _WHENS:
            target.pop(other, None)
    target[parts[-1]] = value


_WHENS = ("at_step", "at_tokens", "at_flops")


def read_toml(path: str | Path, what: str = "config file") -> dict:
    """A TOML file as a dict; a missing file or bad TOML is a ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def config_reference() -> str:
    """Every config key with its default and meaning, read from the dataclasses above (and ModelConfig): the
    comment on a field's line (and its indented continuation lines) is its meaning. ``nanogrow config --show``."""

    out = []
    for section, cls in {**SECTIONS, "stage": StageConfig}.items():
        meaning: dict[str, str] = {}
        last, pending = None, ""
        for line in inspect.getsource(cls).splitlines()[1:]:
            field_m = re.match(r"(\s+)(\w+): [^=]+= .*?(?:\s+#\s?(.*))?$", line)
            comment_m = re.match(r"\s+#(\s*)(.*)$", line)
            if field_m and not line.lstrip().startswith("#"):
                last = field_m.group(2)
                meaning[last] = " ".join(x for x in (pending, (field_m.group(3) or "").strip()) if x)
                pending = ""
            elif comment_m and last and len(comment_m.group(1)) > 1:  # "#" then an indent: the comment goes on
                meaning[last] += " " + comment_m.group(2).strip()
            elif comment_m:
                pending = (pending + " " + comment_m.group(2).strip()).strip()  # a comment before the next field
            else:
                last = None if line.strip() else last
        title = "[[stage]]  (one per growth event; --set stage.N.key=value, N from 1)" if section == "stage" \
            else f"[{section}]"
        out.append(title)
        defaults = cls()
        for f in dataclasses.fields(cls):
            value = getattr(defaults, f.name)
            shown = f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) \
                else ("{}" if value == {} else repr(value))
            out.append(f"  {f.name} = {shown}" + (f"    # {meaning[f.name]}" if meaning.get(f.name) else ""))
        out.append("")
    return "\n".join(out)


def bundled_config_dir() -> Path | None:
    """The configs that come with nanogrow: ``nanogrow/configs`` in an installed wheel (package data mapped from the
    repository's ``configs/``), the repository's ``configs/`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for d in (here / "configs", here.parent / "configs"):
        if (d / "demo.toml").is_file():
            return d
    return None


def bundled_configs() -> dict[str, Path]:
    """name -> file of every bundled config (``demo``, ``gpt2-small``, ``bench/speedup-cpu``, ...)."""
    d = bundled_config_dir()
    if d is None:
        return {}
    files = sorted(d.glob("*.toml")) + sorted((d / "bench").glob("*.toml"))
    return {f.relative_to(d).with_suffix("").as_posix(): f for f in files}


def resolve_config(path: str | Path) -> Path:
    """A config file: ``path`` if it exists, else the bundled config of that name (``demo``, ``demo.toml`` and
    ``configs/demo.toml`` all name ``demo``, so the README's commands work outside a checkout too)."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.as_posix().removesuffix(".toml").removeprefix("configs/")
    found = bundled_configs().get(name)
    if found is not None:
        return found
    raise ConfigError(f"config file {str(p)!r} does not exist, and no bundled config is named {name!r} (bundled: "
                      f"{', '.join(bundled_configs()) or 'none'}; `nanogrow configs` lists them)")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read TOML, apply overrides, build typed config, validate. Raises ConfigError naming the file and key."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = resolve_config(path)
        source = str(path)
        raw = read_toml(path)
    raw = apply_overrides(raw, overrides or [])
    for section in raw:
        if section not in SECTIONS and section != "stage":
            raise ConfigError(f"{source}: unknown section [{section}]; allowed: {', '.join(SECTIONS)}, [[stage]]")
    train = raw.get("train", {})
    if isinstance(train, dict) and train.get("global_batch") and "grad_accum" in train:
        raise ConfigError(f"{source}: train.global_batch={train['global_batch']} and train.grad_accum="
                          f"{train['grad_accum']} are both set; with global_batch, grad_accum is derived "
                          f"(global_batch / (world x micro_batch)): drop train.grad_accum")
    cfg = RunConfig.from_dict(raw, source=source)
    validate(cfg, source)
    return cfg


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


LAG_KEYS = ("candidates", "steps", "eval_every", "score_batches", "groups", "strategy")


@dataclass(frozen=True)
class LagConfig:
    """A stage's ``lag`` table, typed: read once (``from_dict``, which checks the keys and values) instead of
    ``lag.get(key, default)`` wherever it is used."""

    candidates: Any = "design-space"  # "design-space" (the depth design space) | [{op, options}, ...]
    steps: int = 0  # k: steps each candidate trains before the decision
    eval_every: int = 1  # score every candidate every this many of its steps (and after its last)
    # Candidates are scored on this many micro-batches (micro_batch sequences of the stage's seq_len, per rank) taken
    # from the training stream when the selection starts: held out (the run never trains on them), the same for every
    # candidate, and never validation data. Their forward passes are charged as the selection's FLOPs.
    score_batches: int = 4
    groups: int = 1  # process groups training candidates at the same time (must divide the world)
    strategy: str = "all"  # all | halving

    @classmethod
    def from_dict(cls, lag: dict, key: str = "lag") -> LagConfig:
        for k in lag:
            if k == "eval_batches":
                raise ValueError(f"{key}.eval_batches was replaced by {key}.score_batches: candidates are scored "
                                 f"on held-out training micro-batches, never on the validation data that scores "
                                 f"the result (default {cls.score_batches} micro-batches)")
            if k not in LAG_KEYS:
                raise ValueError(f"{key} has unknown key {k!r}; allowed: {', '.join(sorted(LAG_KEYS))}")
        return cls(**lag)

    def check(self, key: str = "lag") -> None:
        steps, every, groups = self.steps, self.eval_every, self.groups
        if not isinstance(steps, int) or steps < 1 or not isinstance(every, int) or every < 1:
            raise ValueError(f"{key}.steps and {key}.eval_every must be positive integers, got {steps!r}, {every!r}")
        if not isinstance(self.score_batches, int) or isinstance(self.score_batches, bool) or self.score_batches < 1:
            raise ValueError(f"{key}.score_batches must be a positive integer (training micro-batches held out to "
                             f"score the candidates on), got {self.score_batches!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"{key}.strategy must be one of {', '.join(STRATEGIES)} (all: every candidate k steps; "
                             f"halving: successive halving with the same budget), got {self.strategy!r}")
        if self.strategy == "halving" and groups != 1:
            raise ValueError(f"{key}: strategy 'halving' runs its rounds one candidate after another; groups="
                             f"{groups} is for strategy 'all' (leave groups = 1)")
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"{key}.groups must be a positive integer (process groups training candidates at the "
                             f"same time; the world size must divide by it), got {groups!r}")

    def candidate_list(self, old: ModelConfig, new: ModelConfig) -> list[Candidate]:
        """The LAG candidates of a stage: the depth design space, or an explicit list of {op, options}."""
        spec = self.candidates
        if spec == "design-space":
            if new.n_layer <= old.n_layer or any(getattr(new, f) != getattr(old, f)
                                                 for f in ("d_model", "d_ff", "n_head")):
                raise ValueError("candidates='design-space' is the depth design space: the stage must add layers only")
            return default_candidates(old.n_layer, new.n_layer)
        if not isinstance(spec, list) or not spec:
            raise ValueError(f"candidates must be 'design-space' or a non-empty list of {{op, options}}, got {spec!r}")
        out = []
        for j, c in enumerate(spec):
            if not isinstance(c, dict) or "op" not in c or set(c) - {"op", "options"}:
                raise ValueError(f"candidates[{j}] must be a table {{op = ..., options = {{...}}}}, got {c!r}")
            out.append(Candidate(c["op"], dict(c.get("options", {}))))
        return out


def _check_lag(lag: dict, old: ModelConfig, new: ModelConfig, seed: int, key: str) -> None:
    lc = LagConfig.from_dict(lag, key)
    lc.check(key)
    for j, c in enumerate(lc.candidate_list(old, new)):
        try:
            make_plan(c.op, old, new, seed=seed, **c.options)
        except ValueError as e:
            raise ValueError(f"{key}.candidates[{j}] ({c.name()}): {e}") from None


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
        for name, allowed in (("optimizer", CHOICES["growth.optimizer"]), ("lr_policy", CHOICES["growth.lr_policy"])):
            value = getattr(st, name)
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


def from_accelerate(t: TrainConfig, env: dict | None = None) -> str | None:
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
