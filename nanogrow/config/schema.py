"""The run configuration's schema: the typed sections with their defaults (each field's comment is its meaning:
``config_reference``), the values a key allows, and building the typed config from a TOML-shaped dict with errors
that name the key at fault."""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from ..frozen import Freezable
from ..lag import STRATEGIES, Candidate, default_candidates
from ..model import ModelConfig


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
    kwargs: dict[str, Any] = {}
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
