"""A study: a base run config, a FLOPs budget, named arms, seeds; resolved into one RunConfig per run.

A study file (``configs/handbook/*.toml``)::

    [study]
    title = "G1: when to grow"             # shown in HANDBOOK.md
    base = "base.toml"                     # a run config, relative to the study file: the target shape and the
                                           # from-scratch budget (train.max_steps at the final shape)
    seeds = [0, 1, 2]
    reference = "scratch"                  # the from-scratch arm every grown arm is compared with
    frontier = "frontier.toml"             # optional: each arm against the scratch frontier's fit at its FLOPs
    other_shapes = ["start alone"]         # optional: arms that may end in another shape (yardsticks); one without
                                           # stages trains as many steps as spend the budget in its own shape
    lr_grid = [1e-3, 3e-3, 1e-2]           # the reference is trained at each; the best mean final loss is "tuned"
    scratch_scales = [2, 4]                # extra reference runs at k x the budget (effective compute multiplier;
                                           # a scale below 1, e.g. 0.5, brackets an arm that loses to the reference)
    tune_seeds = [0]                       # optional: tune the lr on these seeds only (default: every seed)
    lr_extensions = 2                      # optional: extend the grid by x2 past an edge that is best, this often
    model = { d_model = 32 }               # optional: the target shape, fields of the base's [model] that differ
    tokens_per_param = 32                  # optional: the budget as tokens per parameter of the reference (N counts
                                           # every matmul parameter, the frontier's N); replaces train.max_steps
    regime_arm = "L/4 at 75%"              # optional: the arm that enters the part-3 growth law (handbook/regime.py)
    prep = ["--source", "demo", ...]       # `nanogrow prep` arguments that make the base's data.dir if missing

    [arms.scratch]                         # an arm with no stages trains the final shape from step 0

    [arms."L/2 at 25%"]
    model = { n_layer = 4 }                # start shape (fields of [model] that differ from the base)
    stage = [{ at_frac = 0.25, shape = { n_layer = 8 } }]
    set = { "growth.optimizer" = "map" }   # any other config key, dotted

Budget: every arm spends the FLOPs of the reference trained for ``train.max_steps`` steps (the base), to within one
step. A stage's ``at_frac`` is the fraction of that budget spent before its growth event; it is resolved to
``at_step`` from the stage shapes, and the last stage trains until the budget is spent. Grown arms train at the
tuned learning rate (the reference's best over ``lr_grid``) unless they set ``train.lr`` themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import SECTIONS, ConfigError, RunConfig, load_config, read_toml, validate
from ..schedule import stage_layouts, stage_start_steps

STUDY_KEYS = {"title", "question", "base", "seeds", "reference", "lr_grid", "scratch_scales", "prep", "notes",
              "ladder_arm", "baseline", "frontier", "other_shapes", "tune_seeds", "lr_extensions", "tokens_per_param",
              "regime_arm", "model"}
LR_FACTOR = 2.0  # an lr grid extended past its edge steps by this factor (the frontier's default too)
ARM_KEYS = {"model", "stage", "set", "about"}


@dataclass
class Arm:
    name: str
    model: dict = field(default_factory=dict)
    stage: list[dict] = field(default_factory=list)
    set: dict = field(default_factory=dict)
    about: str = ""


@dataclass
class Run:
    """One run of a study: which arm, seed, lr and budget scale, and the config it resolves to."""
    arm: str
    seed: int
    lr: float
    scale: float
    cfg: RunConfig

    @property
    def key(self) -> str:
        return config_hash(self.cfg)


@dataclass
class Study:
    path: Path
    name: str
    title: str
    base: RunConfig
    base_path: Path
    seeds: list[int]
    reference: str
    lr_grid: list[float]
    scratch_scales: list[float]
    arms: dict[str, Arm]
    prep: list[str] = field(default_factory=list)
    question: str = ""
    notes: str = ""
    ladder_arm: str = ""  # a rung of the growth scaling ladder: this arm against the reference, across studies
    # Grown arms compared with each other, paired by seed: {name prefix: baseline arm}; an arm is paired with the
    # baseline of the longest prefix its name starts with ("" matches every arm). A string means {"": it}.
    baseline: dict[str, str] = field(default_factory=dict)
    # Part 3: the frontier file (its fit is the second yardstick: the best from-scratch model of any size at the same
    # FLOPs), and arms that may end in another shape than the reference (the start model trained alone, yardsticks).
    frontier: Path | None = None
    other_shapes: list[str] = field(default_factory=list)
    tune_seeds: list[int] = field(default_factory=list)  # empty: every seed tunes
    lr_extensions: int = 0
    tokens_per_param: float | None = None
    regime_arm: str = ""

    def baseline_of(self, arm: str) -> str | None:
        """The arm this one is paired with in the study's comparison table, or None (the reference, an arm no
        prefix matches, an arm whose baseline is itself)."""
        prefixes = [p for p in self.baseline if arm.startswith(p)]
        if arm == self.reference or not prefixes:
            return None
        base = self.baseline[max(prefixes, key=len)]
        return None if base == arm else base

    @property
    def store_path(self) -> Path:
        return self.path.with_suffix(".jsonl")

    @property
    def budget_flops(self) -> float:
        """FLOPs of the reference: the final shape trained for the base's ``train.max_steps`` steps."""
        lay = stage_layouts(self.base.model, self.base.data.seq_len, self.base.train.micro_batch, [])[0]
        return self.base.train.max_steps * lay.tokens_per_step(1, self.base.train.grad_accum) * lay.flops_per_token()

    def arm_config(self, arm: str, seed: int, lr: float, scale: float = 1.0) -> RunConfig:
        """The run config of ``arm`` at ``seed``: base, then the arm's start shape, stages and overrides, then the
        budget resolved (``at_frac`` -> ``at_step``, ``train.max_steps`` so that the run spends the budget)."""
        a = self.arms[arm]
        raw = copy.deepcopy(self.base.to_dict())
        raw["model"].update(a.model)
        raw["stage"] = []
        for key, value in a.set.items():
            section, _, name = key.partition(".")
            if section not in SECTIONS or not name or "." in name:
                raise ConfigError(f"{self.path}: arms.{arm}.set key {key!r} must be one of "
                                  f"{', '.join(s + '.<key>' for s in SECTIONS)}")
            raw[section][name] = value
        raw["train"]["lr"] = raw["train"]["lr"] if "train.lr" in a.set else lr
        raw["train"]["max_steps"] = round(self.base.train.max_steps * scale)
        raw["train"]["max_flops"] = raw["train"].get("max_flops", 0.0) * scale  # a FLOPs budget scales with it
        for key in ("train.seed", "data.seed", "growth.seed"):
            section, name = key.split(".")
            raw[section][name] = seed
        raw["train"]["out_dir"] = f"runs/handbook/{self.name}/{_slug(arm)}-s{seed}-lr{lr:g}-x{scale:g}"
        source = f"{self.path} arm {arm!r}"
        fracs = []
        for i, st in enumerate(a.stage, start=1):
            st = dict(st)
            frac = st.pop("at_frac", None)
            if frac is not None and not 0.0 < float(frac) < 1.0:
                raise ConfigError(f"{source}: stage[{i}].at_frac={frac} must be in (0, 1)")
            fracs.append(frac)
            if frac is not None:
                st["at_step"] = 0  # placeholder, resolved below once the layouts are known
            raw["stage"].append(st)
        cfg = RunConfig.from_dict(raw, source=source)
        if any(f is not None for f in fracs):
            if not all(f is not None for f in fracs):
                raise ConfigError(f"{source}: give every stage an at_frac, or none")
            _resolve_fractions(cfg, fracs, self.budget_flops * scale, source)
        elif cfg.stage and cfg.growth.schedule != "manual":
            _resolve_budgeted_schedule(cfg, self.budget_flops * scale, source)
        elif not cfg.stage and arm in self.other_shapes:  # another shape from scratch: the same FLOPs, other steps
            lay = stage_layouts(cfg.model, cfg.data.seq_len, cfg.train.micro_batch, [])[0]
            per_step = lay.tokens_per_step(1, cfg.train.grad_accum) * lay.flops_per_token()
            cfg.train.max_steps = max(1, round(self.budget_flops * scale / per_step))
        validate(cfg, source)
        return cfg

    def runs(self, arm: str, seeds: list[int], lr: float, scales: list[float] = (1.0,)) -> list[Run]:
        return [Run(arm, s, lr, k, self.arm_config(arm, s, lr, k)) for s in seeds for k in scales]

    def check(self) -> None:
        """Refuse a study whose arms do not end in the reference's shape (losses would not be comparable)."""
        if self.reference not in self.arms:
            raise ConfigError(f"{self.path}: study.reference {self.reference!r} is not an arm ({', '.join(self.arms)})")
        want = final_shape(self.arm_config(self.reference, self.seeds[0], self.lr_grid[0]))
        for name in self.arms:
            if name in self.other_shapes:
                continue
            got = final_shape(self.arm_config(name, self.seeds[0], self.lr_grid[0]))
            if got != want:
                diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
                raise ConfigError(f"{self.path}: arm {name!r} ends in another shape than the reference "
                                  f"{self.reference!r}: {diff} (arm, reference)")
        if self.arms[self.reference].stage:
            raise ConfigError(f"{self.path}: the reference arm {self.reference!r} must train from scratch (no stages)")


def final_shape(cfg: RunConfig) -> dict:
    lay = stage_layouts(cfg.model, cfg.data.seq_len, cfg.train.micro_batch, cfg.stage)[-1]
    return {**dataclasses.asdict(dataclasses.replace(lay.model, kernels=lay.model.kernels)), "seq_len": lay.seq_len}


def _resolve_fractions(cfg: RunConfig, fracs: list[float], budget: float, source: str) -> None:
    """Stage i starts once ``fracs[i]`` of ``budget`` is spent; the last stage runs until all of it is."""
    t = cfg.train
    layouts = stage_layouts(cfg.model, cfg.data.seq_len, t.micro_batch, cfg.stage)
    per_step = [lay.tokens_per_step(1, t.grad_accum) * lay.flops_per_token() for lay in layouts]
    step, spent = 0, 0.0
    for i, (st, frac) in enumerate(zip(cfg.stage, fracs)):
        n = max(1, round((frac * budget - spent) / per_step[i]))
        step, spent = step + n, spent + n * per_step[i]
        if spent >= budget:
            raise ConfigError(f"{source}: stage[{i + 1}].at_frac={frac} leaves no budget for the stages after it")
        st.at_step = step
    t.max_steps = step + max(1, round((budget - spent) / per_step[-1]))
    if t.warmup_steps >= cfg.stage[0].at_step:
        raise ConfigError(f"{source}: the first growth (step {cfg.stage[0].at_step}) comes before the end of the "
                          f"warm-up (train.warmup_steps={t.warmup_steps}); grow later")


def run_flops(cfg: RunConfig) -> float:
    """Training FLOPs of a run whose stage boundaries are known in advance (at_step, or a budgeted schedule)."""
    t, g = cfg.train, cfg.growth
    layouts = stage_layouts(cfg.model, cfg.data.seq_len, t.micro_batch, cfg.stage)
    if cfg.stage and g.schedule != "manual":
        starts = stage_start_steps(g.schedule, t.max_steps, [lay.tokens_per_step(1, t.grad_accum) for lay in layouts],
                                   [lay.flops_per_token() for lay in layouts], g.exp_ratio)
    else:
        starts = [st.at_step for st in cfg.stage]
    ends = starts + [t.max_steps]
    return sum((e - b) * lay.tokens_per_step(1, t.grad_accum) * lay.flops_per_token()
               for lay, b, e in zip(layouts, [0] + starts, ends))


def _resolve_budgeted_schedule(cfg: RunConfig, budget: float, source: str) -> None:
    """growth.schedule = equal-tokens | equal-flops | exponential places the stages from train.max_steps: choose the
    max_steps whose run spends ``budget`` (FLOPs grow with max_steps; bisection)."""
    lo = hi = 4 * (len(cfg.stage) + 1)  # fewer steps leave some stage none
    while run_flops(_with_steps(cfg, hi)) < budget:
        lo, hi = hi, hi * 2
        if hi > 10**8:
            raise ConfigError(f"{source}: no step count spends the budget {budget:.3e}")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if run_flops(_with_steps(cfg, mid)) < budget else (lo, mid)
    best = min((lo, hi), key=lambda n: abs(run_flops(_with_steps(cfg, n)) - budget))
    cfg.train.max_steps = best


def _with_steps(cfg: RunConfig, n: int) -> RunConfig:
    c = copy.copy(cfg)
    c.train = dataclasses.replace(cfg.train, max_steps=n)
    return c


EXECUTION_KEYS = ("out_dir", "compile")  # how and where a run executes, not what it computes


def config_hash(cfg: RunConfig | dict) -> str:
    """What identifies a run's result: every config value that differs from nanogrow's defaults, but where it writes
    (out_dir) and whether torch.compile runs it (train.compile: the same computation up to floating-point rounding,
    which training amplifies, as a change of thread count or machine does; ``handbook run --compile`` finds the
    runs stored eager, and the reverse, and warns where a study would mix both: ``runner.compiled``). Only
    non-defaults count so that a new config key, added with a default that keeps the old behaviour, leaves the
    results already stored valid; a changed default changes the hash of every run that relied on it."""
    d = cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
    defaults = RunConfig().to_dict()
    key = {section: {k: v for k, v in d[section].items() if v != defaults[section].get(k, object())}
           for section in d if section != "stage"}
    for how in EXECUTION_KEYS:
        key["train"].pop(how, None)
    key["stage"] = d.get("stage", [])
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def load_study(path: str | Path) -> Study:
    p = Path(path)
    raw = read_toml(p, "study file")
    unknown = set(raw) - {"study", "arms"}
    if unknown or "study" not in raw or "arms" not in raw:
        raise ConfigError(f"{p}: a study has exactly a [study] table and [arms.NAME] tables; found "
                          f"{sorted(raw)}")
    s = raw["study"]
    bad = set(s) - STUDY_KEYS
    if bad:
        raise ConfigError(f"{p}: unknown key(s) {sorted(bad)} in [study]; allowed: {', '.join(sorted(STUDY_KEYS))}")
    for key in ("title", "base", "seeds", "reference", "lr_grid"):
        if key not in s:
            raise ConfigError(f"{p}: [study] needs {key!r}")
    if not s["seeds"] or not all(isinstance(x, int) for x in s["seeds"]):
        raise ConfigError(f"{p}: study.seeds must be a non-empty list of integers, got {s['seeds']!r}")
    if not s["lr_grid"] or not all(isinstance(x, (int, float)) and x > 0 for x in s["lr_grid"]):
        raise ConfigError(f"{p}: study.lr_grid must be a non-empty list of positive numbers, got {s['lr_grid']!r}")
    scales = s.get("scratch_scales", [])
    if not all(isinstance(x, (int, float)) and x > 0 and x != 1 for x in scales):
        raise ConfigError(f"{p}: study.scratch_scales must be positive numbers other than 1 (multiples of the "
                          f"budget), got {scales!r}")
    tune = s.get("tune_seeds", [])
    if not isinstance(tune, list) or not set(tune) <= set(s["seeds"]):
        raise ConfigError(f"{p}: study.tune_seeds must be a list of some of study.seeds {s['seeds']}, got {tune!r}")
    ext = s.get("lr_extensions", 0)
    if not isinstance(ext, int) or isinstance(ext, bool) or ext < 0:
        raise ConfigError(f"{p}: study.lr_extensions must be an integer >= 0, got {ext!r}")
    base_path = (p.parent / s["base"]).resolve()
    base = load_config(base_path)
    tpp = s.get("tokens_per_param")
    if tpp is not None and (not isinstance(tpp, (int, float)) or isinstance(tpp, bool) or tpp <= 0):
        raise ConfigError(f"{p}: study.tokens_per_param must be a positive number, got {tpp!r}")
    if not isinstance(s.get("model", {}), dict):
        raise ConfigError(f"{p}: study.model must be a table of [model] fields, got {s['model']!r}")
    if s.get("model") or tpp is not None:
        base = _with_model_and_length(base, s.get("model", {}), None if tpp is None else float(tpp), p)
    arms = {}
    for name, a in raw["arms"].items():
        if not isinstance(a, dict) or set(a) - ARM_KEYS:
            raise ConfigError(f"{p}: arms.{name} may only have {', '.join(sorted(ARM_KEYS))}; got "
                              f"{sorted(a) if isinstance(a, dict) else a!r}")
        arms[name] = Arm(name, **a)
    study = Study(path=p, name=p.stem, title=s["title"], base=base, base_path=base_path, seeds=list(s["seeds"]),
                  reference=s["reference"], lr_grid=[float(x) for x in s["lr_grid"]],
                  scratch_scales=[float(x) for x in scales], arms=arms, prep=list(s.get("prep", [])),
                  question=s.get("question", ""), notes=s.get("notes", ""), ladder_arm=s.get("ladder_arm", ""),
                  baseline=_baselines(p, s.get("baseline", {}), arms),
                  frontier=(p.parent / s["frontier"]).resolve() if s.get("frontier") else None,
                  other_shapes=list(s.get("other_shapes", [])), tune_seeds=list(tune), lr_extensions=ext,
                  tokens_per_param=None if tpp is None else float(tpp), regime_arm=s.get("regime_arm", ""))
    for name in study.other_shapes:
        if name not in arms or name == study.reference:
            raise ConfigError(f"{p}: study.other_shapes {name!r} must be an arm other than the reference "
                              f"({', '.join(arms)})")
    if study.frontier is not None and not study.frontier.is_file():
        raise ConfigError(f"{p}: study.frontier {s['frontier']!r}: no such file ({study.frontier})")
    for key in ("ladder_arm", "regime_arm"):
        if getattr(study, key) and getattr(study, key) not in arms:
            raise ConfigError(f"{p}: study.{key} {getattr(study, key)!r} is not an arm ({', '.join(arms)})")
    study.check()
    return study


def _with_model_and_length(base: RunConfig, model: dict, tpp: float | None, p: Path) -> RunConfig:
    """The base with the study's target shape (``model``) and, given ``tpp``, ``train.max_steps`` set so that the
    reference trains for ``tpp`` tokens per parameter (N: the matmul parameters of the target)."""
    raw = copy.deepcopy(base.to_dict())
    raw["model"].update(model)
    cfg = RunConfig.from_dict(raw, source=f"{p} study.model")
    if tpp is not None:
        lay = stage_layouts(cfg.model, cfg.data.seq_len, cfg.train.micro_batch, [])[0]
        n = lay.model.num_params(include_embedding=False)
        raw["train"]["max_steps"] = max(1, round(tpp * n / lay.tokens_per_step(1, cfg.train.grad_accum)))
        cfg = RunConfig.from_dict(raw, source=f"{p} study.tokens_per_param")
    validate(cfg, str(p))
    return cfg


def regime_params(study: Study) -> int:
    """N of the growth law and of the frontier: every matmul parameter of the reference's final shape."""
    cfg = study.arm_config(study.reference, study.seeds[0], study.lr_grid[0])
    return stage_layouts(cfg.model, cfg.data.seq_len, cfg.train.micro_batch, [])[0].model.num_params(False)


def _baselines(p: Path, value, arms: dict) -> dict[str, str]:
    if isinstance(value, str):
        value = {"": value}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{p}: study.baseline must be an arm's name or a table {{name prefix = arm}}, got {value!r}")
    for prefix, arm in value.items():
        if arm not in arms:
            raise ConfigError(f"{p}: study.baseline {prefix!r} = {arm!r} is not an arm ({', '.join(arms)})")
    return dict(value)


STUDY_DIR = Path(__file__).resolve().parents[2] / "configs" / "handbook"


def studies_in(directory: str | Path = STUDY_DIR) -> list[Study]:
    """Every study file in ``directory`` (TOML files with a [study] table; base configs are skipped)."""
    out = []
    for p in sorted(Path(directory).glob("*.toml")):
        if "[study]" in p.read_text():
            out.append(load_study(p))
    return out


def budget_check(study: Study) -> list[str]:
    """Each arm's FLOPs as a multiple of the budget (should be 1 to within a step): lines for `handbook list`."""
    lines = []
    for name in study.arms:
        cfg = study.arm_config(name, study.seeds[0], study.lr_grid[0])
        if any(st.trigger != "schedule" for st in cfg.stage):
            lines.append(f"{name}: growth decided by trigger(s) {[st.trigger for st in cfg.stage]} while training; "
                         f"train.max_flops = {cfg.train.max_flops / study.budget_flops:.4f} x budget")
            continue
        flops = run_flops(cfg)
        at = ([st.at_step for st in cfg.stage] if cfg.growth.schedule == "manual" else f"{cfg.growth.schedule}")
        lines.append(f"{name}: {cfg.train.max_steps} steps, growth at {at}, {flops / study.budget_flops:.4f} x budget")
    return lines
