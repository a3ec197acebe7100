"""The scratch frontier: IsoFLOP profiles of models trained from scratch, and the Chinchilla fit L(N, D) through them.

This is the yardstick every growth number is held against: at a FLOPs budget C, the best from-scratch model of any
size. A frontier file (``configs/handbook/frontier.toml``)::

    [frontier]
    title = "The scratch frontier"
    base = "base-frontier.toml"      # data, sequence length, batch, schedule (fully decayed), evaluation
    seeds = [0]                      # the seed every (size, budget, lr) point is tuned on
    extra_seeds = [1, 2]             # run as well at each budget's best size and its tuned lr
    lr_grid = [4e-3, 8e-3, 1.6e-2]   # tried at every (size, budget); extended by lr_factor while the best is at an edge
    lr_factor = 2.0
    max_lr_extensions = 2
    prep = [...]                     # `nanogrow prep` arguments that make the base's data.dir if missing

    [sizes.2x32]                     # fields of [model] that differ from the base
    model = { n_layer = 2, d_model = 32, n_head = 2, n_kv_head = 1 }

    [[budget]]
    flops = 1e12                     # every run of this profile spends this many training FLOPs (to within a step)
    sizes = ["2x24", "2x32", ...]
    lr_grid = [2e-3, 4e-3, 8e-3]     # optional: this profile's grid instead of frontier.lr_grid

Selection (the tuned lr, the best size of a profile) uses the final loss on the validation split; every number the
Handbook reports is the loss on the test split, which nothing was tuned or selected on.

Fit (Hoffmann et al. 2022, approach 3): L(N, D) = E + A / N^alpha + B / D^beta over every tuned point, N = the
parameters that take part in a matmul (all but the input embedding; the LM head is most of a small model) and D =
training tokens, by a Huber loss (delta 1e-3) on log L from a grid of starts; 95% intervals by a bootstrap over the
points. The compute-optimal size follows in closed form with C = k N D (k = the measured FLOPs per token per
parameter, ~6 x 1.17 here, the attention term included): N*(C) = G (C / k)^(beta / (alpha + beta)),
G = (alpha A / (beta B))^(1 / (alpha + beta)).
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, RunConfig, load_config, read_toml, validate
from ..schedule import stage_layouts
from .store import Store
from .study import Run, _slug, config_hash

FRONTIER_KEYS = {"title", "question", "base", "seeds", "extra_seeds", "lr_grid", "lr_factor", "max_lr_extensions",
                 "prep", "notes"}


@dataclass
class Frontier:
    path: Path
    name: str
    title: str
    base: RunConfig
    sizes: dict[str, dict]
    budgets: list[tuple[float, list[str]]]  # (FLOPs, sizes of that IsoFLOP profile), smallest budget first
    seeds: list[int]
    extra_seeds: list[int]
    lr_grid: list[float]
    lr_factor: float = 2.0
    budget_lr_grids: dict[float, list[float]] = field(default_factory=dict)  # a budget's own grid, where it has one
    max_lr_extensions: int = 2
    prep: list[str] = field(default_factory=list)
    question: str = ""
    notes: str = ""

    @property
    def store_path(self) -> Path:
        return self.path.with_suffix(".jsonl")

    def grid_at(self, budget: float) -> list[float]:
        """The lr grid every size of the ``budget`` profile is tried at (before extensions)."""
        return self.budget_lr_grids.get(budget, self.lr_grid)

    def layout(self, size: str):
        cfg = self.config(size, self.budgets[0][0], self.seeds[0], self.lr_grid[0], steps=1)
        return stage_layouts(cfg.model, cfg.data.seq_len, cfg.train.micro_batch, [])[0]

    def flops_per_step(self, size: str) -> float:
        lay = self.layout(size)
        return lay.tokens_per_step(1, self.base.train.grad_accum) * lay.flops_per_token()

    def params(self, size: str) -> int:
        """N of the fit: parameters that take part in a matmul (all but the input embedding)."""
        return self.layout(size).model.num_params(include_embedding=False)

    def config(self, size: str, budget: float, seed: int, lr: float, steps: int | None = None) -> RunConfig:
        raw = copy.deepcopy(self.base.to_dict())
        raw["model"].update(self.sizes[size])
        raw["stage"] = []
        raw["train"]["lr"] = lr
        for section in ("train", "data", "growth"):
            raw[section]["seed"] = seed
        raw["train"]["out_dir"] = f"runs/handbook/{self.name}/{_slug(size)}-C{budget:.3g}-s{seed}-lr{lr:g}"
        source = f"{self.path} size {size!r}"
        if steps is None:
            steps = max(1, round(budget / self._per_step(raw, source)))
        raw["train"]["max_steps"] = steps
        cfg = RunConfig.from_dict(raw, source=source)
        validate(cfg, source)
        return cfg

    @staticmethod
    def _per_step(raw: dict, source: str) -> float:
        cfg = RunConfig.from_dict({**raw, "train": {**raw["train"], "max_steps": 1}}, source=source)
        lay = stage_layouts(cfg.model, cfg.data.seq_len, cfg.train.micro_batch, [])[0]
        return lay.tokens_per_step(1, cfg.train.grad_accum) * lay.flops_per_token()

    def run(self, size: str, budget: float, seed: int, lr: float) -> Run:
        # Run.scale carries the budget as a multiple of the smallest one (the store's records are keyed by config).
        return Run(size, seed, lr, budget / self.budgets[0][0], self.config(size, budget, seed, lr))


def load_frontier(path: str | Path) -> Frontier:
    p = Path(path)
    raw = read_toml(p, "frontier file")
    unknown = set(raw) - {"frontier", "sizes", "budget"}
    if unknown or not {"frontier", "sizes", "budget"} <= set(raw):
        raise ConfigError(f"{p}: a frontier file has exactly a [frontier] table, [sizes.NAME] tables and "
                          f"[[budget]] entries; found {sorted(raw)}")
    f = raw["frontier"]
    bad = set(f) - FRONTIER_KEYS
    if bad:
        raise ConfigError(f"{p}: unknown key(s) {sorted(bad)} in [frontier]; allowed: {', '.join(sorted(FRONTIER_KEYS))}")
    for key in ("title", "base", "seeds", "lr_grid"):
        if key not in f:
            raise ConfigError(f"{p}: [frontier] needs {key!r}")
    for key in ("seeds", "extra_seeds"):
        v = f.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, int) for x in v) or (key == "seeds" and not v):
            raise ConfigError(f"{p}: frontier.{key} must be a list of integers, got {v!r}")
    grid = _lr_grid(p, "frontier.lr_grid", f["lr_grid"])
    sizes = {}
    for name, s in raw["sizes"].items():
        if not isinstance(s, dict) or set(s) != {"model"} or not isinstance(s["model"], dict):
            raise ConfigError(f"{p}: sizes.{name} must be {{ model = {{ ... }} }}, got {s!r}")
        sizes[name] = dict(s["model"])
    budgets, budget_lr_grids = [], {}
    for i, b in enumerate(raw["budget"], start=1):
        if not isinstance(b, dict) or not {"flops", "sizes"} <= set(b) <= {"flops", "sizes", "lr_grid"}:
            raise ConfigError(f"{p}: budget[{i}] must have flops and sizes (and optionally lr_grid), got {b!r}")
        missing = [s for s in b["sizes"] if s not in sizes]
        if missing:
            raise ConfigError(f"{p}: budget[{i}].sizes {missing} are not [sizes] tables ({', '.join(sizes)})")
        if len(b["sizes"]) < 3 or not (isinstance(b["flops"], (int, float)) and b["flops"] > 0):
            raise ConfigError(f"{p}: budget[{i}] needs flops > 0 and >= 3 sizes, got {b!r}")
        budgets.append((float(b["flops"]), list(b["sizes"])))
        if "lr_grid" in b:
            budget_lr_grids[float(b["flops"])] = _lr_grid(p, f"budget[{i}].lr_grid", b["lr_grid"])
    budgets.sort()
    fr = Frontier(path=p, name=p.stem, title=f["title"], base=load_config((p.parent / f["base"]).resolve()),
                  sizes=sizes, budgets=budgets, seeds=list(f["seeds"]), extra_seeds=list(f.get("extra_seeds", [])),
                  lr_grid=grid, budget_lr_grids=budget_lr_grids, lr_factor=float(f.get("lr_factor", 2.0)),
                  max_lr_extensions=int(f.get("max_lr_extensions", 2)), prep=list(f.get("prep", [])),
                  question=f.get("question", ""), notes=f.get("notes", ""))
    for budget, names in budgets:  # every run config resolves (shapes valid, at least a few steps)
        for size in names:
            steps = fr.config(size, budget, fr.seeds[0], grid[0]).train.max_steps
            if steps < 4 * fr.base.train.warmup_steps:
                raise ConfigError(f"{p}: size {size!r} at budget {budget:.3g} trains only {steps} steps (< 4 x "
                                  f"warmup_steps {fr.base.train.warmup_steps}); raise the budget or drop the size")
    return fr


def is_frontier_file(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and "[frontier]" in p.read_text()


def frontiers_in(directory: str | Path | None = None) -> list[Frontier]:
    """Every frontier file in ``directory`` (default: the Handbook's studies, configs/handbook/)."""
    from .study import STUDY_DIR

    return [load_frontier(p) for p in sorted(Path(directory or STUDY_DIR).glob("*.toml")) if is_frontier_file(p)]


# ---- planning ---------------------------------------------------------------------------------------------------

def _finals(fr: Frontier, store: Store, size: str, budget: float, seed: int) -> dict[float, float]:
    """{lr: final validation loss} of the stored runs of (size, budget, seed) whose config is the current one."""
    out = {}
    for r in store.select(size):
        if r["seed"] == seed and math.isclose(r["scale"] * fr.budgets[0][0], budget, rel_tol=1e-9) \
                and r["config_hash"] == config_hash(fr.config(size, budget, seed, r["lr"])):
            out[r["lr"]] = r["final_loss"]
    return out


def _lr_grid(path: Path, key: str, grid) -> list[float]:
    if (not isinstance(grid, list) or len(grid) < 3 or not all(isinstance(x, (int, float)) and x > 0 for x in grid)
            or sorted(grid) != grid):
        raise ConfigError(f"{path}: {key} must be >= 3 increasing positive numbers, got {grid!r}")
    return [float(x) for x in grid]


def lr_grid_for(fr: Frontier, store: Store, size: str, budget: float) -> tuple[list[float], float | None]:
    """The lrs to try at (size, budget): the grid, extended by ``lr_factor`` past an edge that is the best so far
    (at most ``max_lr_extensions`` times). Returns (grid, tuned lr or None while the grid is not done or its best
    is still at an edge that may be extended)."""
    start = fr.grid_at(budget)
    grid = list(start)
    finals = _finals(fr, store, size, budget, fr.seeds[0])
    for _ in range(fr.max_lr_extensions + 1):
        if not all(lr in finals for lr in grid):
            return grid, None
        best = min(grid, key=lambda lr: finals[lr])
        if best not in (grid[0], grid[-1]) or len(grid) >= len(start) + fr.max_lr_extensions:
            return grid, best
        grid = [best / fr.lr_factor] + grid if best == grid[0] else grid + [best * fr.lr_factor]
    return grid, None


def plan_frontier(fr: Frontier, store: Store) -> list[Run]:
    """The runs still to do: every (budget, size) over its lr grid at the tuning seed, then, for a budget whose
    profile is tuned, the extra seeds of its best size at that size's tuned lr."""
    todo = []
    for budget, names in fr.budgets:
        tuned = {}
        for size in names:
            grid, lr = lr_grid_for(fr, store, size, budget)
            todo += [fr.run(size, budget, fr.seeds[0], x) for x in grid]
            tuned[size] = lr
        if all(lr is not None for lr in tuned.values()):
            best = min(names, key=lambda s: _finals(fr, store, s, budget, fr.seeds[0])[tuned[s]])
            todo += [fr.run(best, budget, seed, tuned[best]) for seed in fr.extra_seeds]
    return [r for r in todo if not store.has(r.key)]


# ---- results ----------------------------------------------------------------------------------------------------

@dataclass
class Point:
    """One (size, budget) of a profile at its tuned lr: test losses over the seeds run there."""
    size: str
    budget: float
    lr: float
    params: int
    tokens: float
    flops: float
    test: list[float]  # one per seed
    val: float  # the tuning seed's validation loss (what selected the lr)
    edge: bool = False  # the tuned lr is at an edge of the grid after every extension: the optimum may lie beyond

    @property
    def loss(self) -> float:
        return statistics.fmean(self.test)


def points(fr: Frontier, store: Store) -> list[Point]:
    out = []
    for budget, names in fr.budgets:
        for size in names:
            grid, lr = lr_grid_for(fr, store, size, budget)
            if lr is None:
                continue
            key_of = {seed: config_hash(fr.config(size, budget, seed, lr)) for seed in fr.seeds + fr.extra_seeds}
            runs = [r for r in store.records if r["arm"] == size and key_of.get(r["seed"]) == r["config_hash"]]
            runs = [r for r in runs if r.get("final_test_loss") is not None]
            if not runs:
                continue
            tuning = next((r for r in runs if r["seed"] == fr.seeds[0]), runs[0])
            out.append(Point(size, budget, lr, fr.params(size), tuning["tokens"], tuning["flops"],
                             [r["final_test_loss"] for r in sorted(runs, key=lambda r: r["seed"])],
                             tuning["final_loss"], edge=lr in (grid[0], grid[-1])))
    return out


# ---- the fit ----------------------------------------------------------------------------------------------------

@dataclass
class Fit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    k: float  # FLOPs per token per parameter

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def exponent(self) -> float:
        """a in N*(C) ~ C^a."""
        return self.beta / (self.alpha + self.beta)

    def n_opt(self, flops: float) -> float:
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * (flops / self.k) ** self.exponent

    def frontier(self, flops: float) -> tuple[float, float, float]:
        """(N*, D*, loss) of the compute-optimal model at ``flops``."""
        n = self.n_opt(flops)
        d = flops / (self.k * n)
        return n, d, self.loss(n, d)

    def compute_for_loss(self, loss: float) -> float:
        """The FLOPs at which the frontier reaches ``loss`` (inf at or below E): bisection in log-FLOPs, the frontier
        loss falling monotonically with compute."""
        if loss <= self.E:
            return math.inf
        lo, hi = math.log(1e3), math.log(1e40)
        if self.frontier(math.exp(lo))[2] <= loss:
            return math.exp(lo)
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.frontier(math.exp(mid))[2] > loss else (lo, mid)
        return math.exp(hi)


def fit_chinchilla(n: list[float], d: list[float], loss: list[float], k: float, starts: list | None = None) -> Fit:
    """Hoffmann et al.'s approach 3: minimise the Huber loss (delta 1e-3) of log L - LSE(a - alpha log N,
    b - beta log D, e) by L-BFGS from a grid of starts; returns the best."""
    import torch

    ln = torch.tensor([math.log(x) for x in n], dtype=torch.float64)
    ld = torch.tensor([math.log(x) for x in d], dtype=torch.float64)
    ll = torch.tensor([math.log(x) for x in loss], dtype=torch.float64)
    def objective_of(p: torch.Tensor) -> torch.Tensor:  # p: [..., 5] -> [...]
        a, b, e, al, be = p.unbind(-1)
        pred = torch.logsumexp(torch.stack([a[..., None] - al[..., None] * ln, b[..., None] - be[..., None] * ld,
                                            e[..., None].expand(*e.shape, len(ln))]), dim=0)
        return torch.nn.functional.huber_loss(pred, ll.expand_as(pred), delta=1e-3, reduction="none").sum(-1)

    if starts is None:  # Hoffmann et al.'s grid, screened at once; L-BFGS from the best few
        grid = torch.tensor([(a, b, e, al, be) for a in (0.0, 5.0, 10.0, 15.0, 20.0) for b in (0.0, 5.0, 10.0, 15.0, 20.0)
                             for e in (-1.0, -0.5, 0.0, 0.5, 1.0) for al in (0.1, 0.3, 0.5, 0.8)
                             for be in (0.1, 0.3, 0.5, 0.8)], dtype=torch.float64)
        starts = grid[objective_of(grid).argsort()[:8]].tolist()
    best, best_obj = None, math.inf
    for start in starts:
        x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([x], lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def value():
            return objective_of(x)

        def objective():
            opt.zero_grad()
            obj = value()
            obj.backward()
            return obj

        try:
            opt.step(objective)
        except RuntimeError:
            continue
        with torch.no_grad():
            obj = float(value())
        found = x.detach().tolist()
        if math.isfinite(obj) and obj < best_obj and found[3] > 0 and found[4] > 0:
            best, best_obj = found, obj
    if best is None:
        raise ValueError("the Chinchilla fit did not converge from any start")
    a, b, e, al, be = best
    return Fit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=al, beta=be, k=k)


def bootstrap(pts: list[Point], fit: Fit, reps: int = 200, seed: int = 0) -> list[Fit]:
    """Fits of ``reps`` resamples of the points (with replacement), each started from the full fit."""
    import random

    rng = random.Random(seed)
    start = [(math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta)]
    out = []
    for _ in range(reps):
        sample = [rng.choice(pts) for _ in pts]
        if len({p.params for p in sample}) < 3 or len({p.budget for p in sample}) < 2:
            continue
        try:
            out.append(fit_chinchilla([p.params for p in sample], [p.tokens for p in sample],
                                      [p.loss for p in sample], fit.k, starts=start))
        except ValueError:
            continue
    return out


def interval(values: list[float]) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles."""
    xs = sorted(v for v in values if math.isfinite(v))
    if len(xs) < 10:
        return math.nan, math.nan
    return xs[int(0.025 * (len(xs) - 1))], xs[int(math.ceil(0.975 * (len(xs) - 1)))]


def isoflop_minimum(pts: list[Point]) -> tuple[float, float] | None:
    """Approach 2, locally: the minimum of the parabola in log N through a profile's best point and its two
    neighbours in size: (N, loss), or None when the best is the smallest or largest size measured (the profile does
    not bracket its optimum) or the parabola opens downwards. Local, because a profile's two sides are far from
    symmetric here (undertrained large models lose by much more than small ones)."""
    import numpy as np

    pts = sorted(pts, key=lambda p: p.params)
    if len(pts) < 3:
        return None
    i = min(range(len(pts)), key=lambda j: pts[j].loss)
    if i in (0, len(pts) - 1):
        return None
    near = pts[i - 1:i + 2]
    x = np.log([p.params for p in near])
    c2, c1, c0 = np.polyfit(x, [p.loss for p in near], 2)
    if c2 <= 0:
        return None
    xm = -c1 / (2 * c2)
    return float(math.exp(xm)), float(c0 + c1 * xm + c2 * xm * xm)


@dataclass
class Envelope:
    """The measured frontier, the yardstick growth is held against: at each budget, the test loss of the size its
    profile selected (lowest validation loss at the tuning seed; mean over that size's seeds), joined by straight
    lines in log10 FLOPs. It is an upper bound on the true frontier (sizes between the grid's could do better), so a
    multiplier against it flatters growth, never the reverse. A budget whose best loss is not below every smaller
    budget's is lowered to it (more compute can always buy the smaller budget's model: the frontier cannot rise).
    Outside the budgets measured the end segment's slope is extended, and every answer says whether it was."""
    budgets: list[float]  # ascending
    losses: list[float]  # the lowered best loss at each budget
    bands: list[tuple[float, float]]  # 95% t-interval of each best size's mean over seeds
    sizes: list[str]
    complete: list[bool]  # the budget's profile has every size tuned

    def _segment(self, x: float) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the segment, in (log10 FLOPs, loss), that covers or extends to x."""
        xs = [math.log10(b) for b in self.budgets]
        i = max(0, min(len(xs) - 2, next((j for j in range(len(xs) - 1) if x <= xs[j + 1]), len(xs) - 2)))
        return xs[i], self.losses[i], xs[i + 1], self.losses[i + 1]

    def outside(self, flops: float) -> bool:
        return not self.budgets[0] / 1.01 <= flops <= self.budgets[-1] * 1.01

    def loss_at(self, flops: float) -> float:
        x0, y0, x1, y1 = self._segment(math.log10(flops))
        return y0 + (y1 - y0) * (math.log10(flops) - x0) / (x1 - x0)

    def band_at(self, flops: float) -> tuple[float, float]:
        """The seed interval of the frontier loss at ``flops``, interpolated like the loss (NaN outside)."""
        if self.outside(flops) or any(not math.isfinite(v) for b in self.bands for v in b):
            return math.nan, math.nan
        x = math.log10(flops)
        xs = [math.log10(b) for b in self.budgets]
        i = max(0, min(len(xs) - 2, next((j for j in range(len(xs) - 1) if x <= xs[j + 1]), len(xs) - 2)))
        w = (x - xs[i]) / (xs[i + 1] - xs[i])
        return tuple((1 - w) * self.bands[i][k] + w * self.bands[i + 1][k] for k in (0, 1))

    def compute_for_loss(self, loss: float) -> tuple[float, bool]:
        """(the FLOPs at which the frontier reaches ``loss``, whether that lies outside the budgets measured). The
        lowered losses never rise, so the segment is the first whose end is at or below ``loss``; a flat segment
        that ends exactly at it answers its start."""
        xs = [math.log10(b) for b in self.budgets]
        i = next((j for j in range(len(xs) - 1) if self.losses[j + 1] <= loss), len(xs) - 2)
        x0, y0, x1, y1 = xs[i], self.losses[i], xs[i + 1], self.losses[i + 1]
        if y1 == y0:
            return 10 ** x0, False
        c = 10 ** (x0 + (loss - y0) * (x1 - x0) / (y1 - y0))
        return c, self.outside(c)


def envelope(profiles: dict) -> Envelope | None:
    """The measured frontier of ``frontier_summary``'s profiles, or None with fewer than two budgets."""
    from .stats import mean_ci

    if len(profiles) < 2:
        return None
    budgets, losses, bands, sizes, complete = [], [], [], [], []
    for budget in sorted(profiles):
        best = profiles[budget]["best"]
        _, lo, hi = mean_ci(best.test)
        budgets.append(budget)
        complete.append(profiles[budget]["complete"])
        if losses and losses[-1] < best.loss:  # lowered to the smaller budget's: its size and band carry over
            losses.append(losses[-1])
            bands.append(bands[-1])
            sizes.append(sizes[-1])
            continue
        losses.append(best.loss)
        bands.append((lo, hi))
        sizes.append(best.size)
    return Envelope(budgets, losses, bands, sizes, complete)


def frontier_summary(fr: Frontier, store: Store | None = None, reps: int = 200) -> dict | None:
    """Everything the Handbook shows of the frontier: the tuned points, each profile's best run and parabola
    minimum, the fit with bootstrap intervals, N*(C) and tokens per parameter at each budget."""
    store = store or Store(fr.store_path)
    pts = points(fr, store)
    out = {"points": pts, "profiles": {}, "fit": None}
    for budget, _ in fr.budgets:
        prof = sorted((p for p in pts if p.budget == budget), key=lambda p: p.params)
        if prof:
            out["profiles"][budget] = {"points": prof, "best": min(prof, key=lambda p: p.val),
                                       "parabola": isoflop_minimum(prof),
                                       "complete": {p.size for p in prof} == set(dict(fr.budgets)[budget])}
    out["envelope"] = envelope(out["profiles"])
    budgets_done = [b for b, v in out["profiles"].items() if len(v["points"]) >= 3]
    if len(budgets_done) < 2:
        return out
    k = statistics.fmean(p.flops / (p.tokens * p.params) for p in pts)
    fit = fit_chinchilla([p.params for p in pts], [p.tokens for p in pts], [p.loss for p in pts], k)
    boots = bootstrap(pts, fit, reps)
    out["fit"] = fit
    out["boots"] = boots
    return out


# ---- running ----------------------------------------------------------------------------------------------------

def run_frontier(fr: Frontier, log=print, dry_run: bool = False, jobs: int = 1) -> int:
    """Run what is missing, smallest budget first; re-plan after each batch (lr extensions, extra seeds).
    Returns the number of runs made."""
    from .runner import ensure_data, run_batch

    store = Store(fr.store_path)
    ensure_data(fr, log)
    made = 0
    while True:
        todo = plan_frontier(fr, store)
        if not todo:
            break
        if dry_run:
            for r in todo:
                log(f"would run {r.arm} at {r.scale * fr.budgets[0][0]:.3g} FLOPs, seed {r.seed}, lr {r.lr:g} "
                    f"({r.cfg.train.max_steps} steps)")
            return 0
        made += run_batch(fr, todo, store, jobs=jobs, log=log)
    log(f"[{fr.name}] complete: {len(store.records)} runs")
    return made


def completeness(fr: Frontier) -> str:
    store = Store(fr.store_path)
    return f"{fr.name}: {len(store.records)} runs done, {len(plan_frontier(fr, store))} planned now ({fr.path})"
