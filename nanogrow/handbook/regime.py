"""Part 3's regime sweep: one growth recipe at several target sizes and training lengths, each point a study with
``regime_arm`` (the recipe) and ``tokens_per_param`` (its length), held against two yardsticks on the test split:

  vs target     the effective compute multiplier against the target shape trained from scratch: the FLOPs the
                scratch runs of the same seed (at 0.5x, 1x, 2x ... the budget, each fully decayed) need to end at the
                arm's test loss, interpolated in log-FLOPs, over the arm's FLOPs. A seed whose loss falls outside the
                scratch runs' range is extrapolated: it is flagged and left out of the law.
  vs frontier   the same against the scratch frontier (the best from-scratch model of any size measured: the
                frontier file's envelope, each budget's best size joined in log-FLOPs, extended past its ends by
                the end segments' slopes): > 1 means the grown model beats every from-scratch model measured at
                its FLOPs. The envelope bounds the true frontier from above, so this multiplier flatters growth.

The growth law fitted over the sweep's seed-level points (least squares, t-intervals on each parameter):

    ln m = a + b log10(N) + c log10(D / N)

with N every matmul parameter of the target (the frontier's N) and D / N its tokens per parameter. A term whose
variable takes one value in the sweep is left out (and said so). ``predict`` fits the law without one study and
writes its prediction next to it (``<study>.prediction.json``) before that study is run; the report then sets the
prediction beside the measurement.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .frontier_report import summary_of
from .markdown import figure_and_notes
from .runner import code_commit, tuned_lr
from .stats import effective_flops, fmt_ci, mean_ci, ratio_ci, t975
from .store import Store
from .study import Study, config_hash, regime_params

YARDSTICKS = ("target", "frontier")


@dataclass
class Point:
    """One regime study at its tuned lr: per seed, the recipe's multipliers against both yardsticks."""
    study: str
    shape: str
    params: int  # N: matmul parameters of the target
    non_embedding: int
    tpp: float  # tokens per parameter of the target's scratch run
    budget: float
    lr: float | None
    edge: bool  # the tuned lr sits at an edge of its (extended) grid
    target: dict  # seed -> multiplier vs target-size scratch
    extrapolated: set  # seeds whose target multiplier is extrapolated
    frontier: dict  # seed -> multiplier vs the frontier
    diffs: dict  # seed -> recipe test loss minus target scratch test loss
    start_alone: dict  # seed -> the start shape alone for the whole budget: multiplier vs the frontier
    outside_frontier: bool  # the arm's FLOPs lie outside the frontier's budgets (its envelope is extended there)
    frontier_extrapolated: set = None  # seeds whose loss the frontier reaches only outside its budgets
    # other grown arm -> ({seed: test loss minus target scratch}, {seed: multiplier vs frontier}, {seeds whose
    # frontier multiplier is extrapolated: the frontier reaches their loss only outside its budgets})
    variants: dict = None

    def __post_init__(self):
        self.frontier_extrapolated = set() if self.frontier_extrapolated is None else self.frontier_extrapolated
        self.variants = {} if self.variants is None else self.variants

    def values(self, yardstick: str) -> list[float]:
        """Seed-level multipliers that enter the law (extrapolated ones left out)."""
        got = getattr(self, yardstick)
        skip = self.extrapolated if yardstick == "target" else self.frontier_extrapolated
        return [v for s, v in sorted(got.items()) if s not in skip and v is not None and math.isfinite(v) and v > 0]


def regime_studies(studies: list[Study]) -> list[Study]:
    return [s for s in studies if s.regime_arm]


def regime_point(study: Study, store: Store | None = None) -> Point | None:
    """The study's point, or None while its lr is not tuned."""
    store = store or Store(study.store_path)
    lr, grid = tuned_lr(study, store, study.seeds)
    m = study.base.model.resolved()
    n = regime_params(study)
    point = Point(study.name, f"{m.n_layer} x {m.d_model}", n, m.num_params(False) - m.vocab_size * m.d_model,
                  study.tokens_per_param or 0.0, study.budget_flops, lr, False, {}, set(), {}, {}, {}, False)
    if lr is None:
        return point
    ordered = sorted(grid)
    point.edge = len(ordered) > 1 and lr in (ordered[0], ordered[-1])

    def current(arm: str, seed: int, scale: float = 1.0) -> dict | None:
        key = config_hash(study.arm_config(arm, seed, lr, scale))
        return next((r for r in store.records if r["config_hash"] == key
                     and r.get("final_test_loss") is not None), None)

    env = None
    if study.frontier is not None:
        _, s = summary_of(study.frontier)
        env = s.get("envelope")
        point.outside_frontier = env is not None and env.outside(study.budget_flops)
    start = next((a for a in study.other_shapes), None)
    for seed in study.seeds:
        grown, ref = current(study.regime_arm, seed), current(study.reference, seed)
        if grown is None or ref is None:
            continue
        scratch = [(r["flops"], r["final_test_loss"]) for k in [1.0, *study.scratch_scales]
                   if (r := current(study.reference, seed, k)) is not None]
        if len(scratch) >= 2:
            eff, extrapolated = effective_flops(scratch, grown["final_test_loss"])
            point.target[seed] = eff / grown["flops"]
            if extrapolated:
                point.extrapolated.add(seed)
        point.diffs[seed] = grown["final_test_loss"] - ref["final_test_loss"]
        if env is not None:
            reach, outside = env.compute_for_loss(grown["final_test_loss"])
            point.frontier[seed] = reach / grown["flops"]
            if outside:  # (the arm's own FLOPs may lie past the budgets: only where the frontier reaches its loss counts)
                point.frontier_extrapolated.add(seed)
            alone = current(start, seed) if start else None
            if alone is not None:
                point.start_alone[seed] = env.compute_for_loss(alone["final_test_loss"])[0] / alone["flops"]
        for arm in (a for a, spec in study.arms.items() if spec.stage and a != study.regime_arm):
            other = current(arm, seed)
            if other is None:
                continue
            diffs, mults, outside_seeds = point.variants.setdefault(arm, ({}, {}, set()))
            diffs[seed] = other["final_test_loss"] - ref["final_test_loss"]
            if env is not None:
                reach, outside = env.compute_for_loss(other["final_test_loss"])
                mults[seed] = reach / other["flops"]
                if outside:
                    outside_seeds.add(seed)
    return point


# ---- the law ------------------------------------------------------------------------------------------------------

@dataclass
class Law:
    yardstick: str
    terms: list[str]  # "1", "log10 N", "log10 D/N": the columns fitted
    coef: list[float]
    se: list[float]
    n: int
    resid_sd: float
    cov: list[list[float]]  # of the coefficients
    studies: list[str]

    @property
    def df(self) -> int:
        return self.n - len(self.terms)

    def interval(self, i: int) -> tuple[float, float]:
        half = t975(self.df) * self.se[i]
        return self.coef[i] - half, self.coef[i] + half

    def row(self, params: float, tpp: float) -> list[float]:
        values = {"1": 1.0, "log10 N": math.log10(params), "log10 D/N": math.log10(tpp)}
        return [values[t] for t in self.terms]

    def predict(self, params: float, tpp: float, seeds: int) -> tuple[float, float, float]:
        """The multiplier of a new point measured as the geometric mean over ``seeds`` seeds, and its 95%
        prediction interval (the fit's uncertainty plus the seed mean's own spread)."""
        x = self.row(params, tpp)
        y = sum(c * v for c, v in zip(self.coef, x))
        var_fit = sum(x[i] * self.cov[i][j] * x[j] for i in range(len(x)) for j in range(len(x)))
        half = t975(self.df) * math.sqrt(var_fit + self.resid_sd ** 2 / max(1, seeds))
        return math.exp(y), math.exp(y - half), math.exp(y + half)

    def describe(self) -> str:
        parts = []
        for i, t in enumerate(self.terms):
            lo, hi = self.interval(i)
            parts.append(f"{'a' if t == '1' else t} {self.coef[i]:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        return "; ".join(parts)


def fit_law(points: list[Point], yardstick: str) -> Law | None:
    """Least squares of ln(multiplier) on the terms whose variable varies over the points' seed-level values; None
    with fewer observations than terms + 2 (no interval worth the name)."""
    obs = [(p, v) for p in points for v in p.values(yardstick)]
    terms = ["1"]
    if len({p.params for p, _ in obs}) > 1:
        terms.append("log10 N")
    if len({p.tpp for p, _ in obs}) > 1:
        terms.append("log10 D/N")
    if len(obs) < len(terms) + 2:
        return None
    import torch

    probe = Law(yardstick, terms, [], [], 0, 0.0, [], [])
    x = torch.tensor([probe.row(p.params, p.tpp) for p, _ in obs], dtype=torch.float64)
    y = torch.tensor([math.log(v) for _, v in obs], dtype=torch.float64)
    xtx_inv = torch.linalg.inv(x.T @ x)
    coef = xtx_inv @ x.T @ y
    resid = y - x @ coef
    df = len(obs) - len(terms)
    s2 = float(resid @ resid) / df
    cov = (xtx_inv * s2).tolist()
    return Law(yardstick, terms, coef.tolist(), [math.sqrt(cov[i][i]) for i in range(len(terms))], len(obs),
               math.sqrt(s2), cov, sorted({p.study for p, _ in obs}))


# ---- predictions -------------------------------------------------------------------------------------------------

def prediction_path(study: Study) -> Path:
    return study.path.with_name(f"{study.path.stem}.prediction.json")


def predict(study: Study, studies: list[Study], log=print) -> Path:
    """Fit the law on every other regime study and write this study's predicted multipliers (both yardsticks) to
    ``<study>.prediction.json``. Refused once the study has a result of its recipe arm: a prediction is made
    before the run it predicts."""
    if not study.regime_arm:
        raise ValueError(f"{study.path}: not a regime study (no study.regime_arm)")
    store = Store(study.store_path)
    if store.select(study.regime_arm):
        raise ValueError(f"{study.path}: {study.store_path.name} already holds runs of {study.regime_arm!r}; a "
                         f"prediction is made before the run (delete the store to start over)")
    others = [regime_point(s) for s in regime_studies(studies) if s.path != study.path]
    others = [p for p in others if p is not None]
    seeds = len(study.seeds)
    params, tpp = regime_params(study), study.tokens_per_param or 0.0
    out = {"study": study.name, "params": params, "tokens_per_param": tpp, "seeds": seeds,
           "commit": code_commit(), "made": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "laws": {}}
    for yard in YARDSTICKS:
        law = fit_law(others, yard)
        if law is None:
            raise ValueError(f"{study.path}: too few points for the law against {yard} "
                             f"({sum(len(p.values(yard)) for p in others)} seed-level values)")
        missing = {"log10 N": len({p.params for p in others}) == 1 and params != others[0].params,
                   "log10 D/N": len({p.tpp for p in others}) == 1 and tpp != others[0].tpp}
        if any(missing.values()):
            raise ValueError(f"{study.path}: the law against {yard} has no {[k for k, v in missing.items() if v]} "
                             f"term (one value in the fitted studies), so it cannot predict a new value of it")
        m, lo, hi = law.predict(params, tpp, seeds)
        out["laws"][yard] = {"predicted": m, "lo": lo, "hi": hi, "terms": law.terms, "coef": law.coef,
                             "se": law.se, "n": law.n, "studies": law.studies}
        log(f"{study.name}: predicted multiplier vs {yard}: {m:.3f} [{lo:.3f}, {hi:.3f}] "
            f"(law over {law.n} seed-level points of {', '.join(law.studies)})")
    path = prediction_path(study)
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    log(f"wrote {path}: commit it before running {study.path}")
    return path


# ---- the report --------------------------------------------------------------------------------------------------

def _mult(values: dict, skip: set = frozenset()) -> str:
    vals = [v for s, v in sorted(values.items()) if v is not None and math.isfinite(v) and v > 0]
    if not vals:
        return "n/a"
    flag = f", {len(skip & set(values))} extrapolated" if skip & set(values) else ""
    if len(vals) < 3:
        return ", ".join(f"{v:.2f}x" for v in vals) + f" ({len(vals)} seed{'s' if len(vals) > 1 else ''}{flag})"
    return fmt_ci(*ratio_ci(vals), suffix="x") + (f" ({flag[2:]})" if flag else "")


def regime_markdown(studies: list[Study], plots: bool = True) -> str:
    chosen = regime_studies(studies)
    if not chosen:
        return ""
    points = [p for s in chosen if (p := regime_point(s)) is not None]
    points.sort(key=lambda p: (p.params, p.tpp))
    out = ["## Part 3: the regime sweep and the growth law", "",
           "The recipe (each study's `regime_arm`) at several target sizes, each trained for a fixed number of tokens "
           "per parameter, against the target trained from scratch and against the scratch frontier, on the test "
           "split. Reproduce: `nanogrow handbook run configs/handbook/<study>.toml --jobs 2` for each study below; "
           "method: the docstring of `nanogrow/handbook/regime.py`.", "",
           "| study | target | N (matmul) | non-embedding | tokens/param | budget FLOPs | tuned lr | seeds | "
           "vs target scratch | test loss minus target scratch | vs frontier | start shape alone vs frontier |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lr = "n/a" if p.lr is None else f"{p.lr:g}" + (" (edge)" if p.edge else "")
        diffs = list(p.diffs.values())
        out.append(f"| {p.study} | {p.shape} | {p.params:,} | {p.non_embedding:,} | {p.tpp:g} | {p.budget:.2e} | "
                   f"{lr} | {len(p.diffs)} | {_mult(p.target, p.extrapolated)} | "
                   f"{fmt_ci(*mean_ci(diffs), digits=3) if diffs else 'n/a'} | "
                   f"{_mult(p.frontier, p.frontier_extrapolated)} | "
                   f"{_mult(p.start_alone)} |")
    out += ["", "Multipliers: geometric mean over seeds with a 95% t-interval on the logarithms; > 1 means the recipe "
                "reaches its test loss with less compute than the yardstick needs. Extrapolated seeds (the recipe's "
                "loss outside the scratch runs' range, or reached by the frontier only outside its budgets) are "
                "counted in the table and left out of the law. The frontier here is the measured envelope (each "
                "budget's best size, joined in log-FLOPs), an upper bound on the true frontier: multipliers against "
                "it flatter growth."]
    variants = [(p, arm, *v) for p in points for arm, v in p.variants.items()]
    if variants:
        out += ["", "Other grown arms of the same studies (not in the law):", "",
                "| study | arm | seeds | test loss minus target scratch | vs frontier |", "|---|---|---|---|---|"]
        out += [f"| {p.study} | {arm} | {len(d)} | {fmt_ci(*mean_ci(list(d.values())), digits=3)} | {_mult(m, x)} |"
                for p, arm, d, m, x in variants]
    from .reuse import growth_time_table, reuse_markdown
    out += growth_time_table({p.study: p for p in points}, chosen)
    out += [reuse_markdown(chosen, {p.study: p.lr for p in points})]
    for yard in YARDSTICKS:
        law = fit_law(points, yard)
        label = "the target-size scratch run" if yard == "target" else "the frontier"
        if law is None:
            out += ["", f"Law against {label}: not fitted yet (too few seed-level points)."]
            continue
        left_out = [t for t in ("log10 N", "log10 D/N") if t not in law.terms]
        out += ["", f"Law against {label} (ln m = a + b log10 N + c log10 D/N, {law.n} seed-level points from "
                    f"{len(law.studies)} studies, residual sd {law.resid_sd:.3f}): {law.describe()}"
                    + (f"; left out (one value in the sweep): {', '.join(left_out)}" if left_out else "") + "."]
    for s in chosen:
        path = prediction_path(s)
        if path.exists():
            out += ["", prediction_line(s, json.loads(path.read_text()), next(p for p in points if p.study == s.name))]
    png = regime_plot(points, chosen[0].path.parent / "plots" / "regime.png") if plots else None
    return "\n".join(out + figure_and_notes("regime sweep", png, chosen[0].path.with_name("regime.toml")))


def prediction_line(study: Study, pred: dict, point: Point) -> str:
    parts = []
    for yard in YARDSTICKS:
        law = pred["laws"].get(yard)
        if not law:
            continue
        vals = point.values(yard)
        left_out = len(getattr(point, yard)) - len(vals)
        measured = (fmt_ci(*ratio_ci(vals), suffix="x") if len(vals) >= 3 else
                    ", ".join(f"{v:.2f}x" for v in vals) or ("only extrapolated seeds" if left_out else "not run yet"))
        if vals and left_out:
            measured += f" ({left_out} extrapolated seed{'s' if left_out > 1 else ''} left out)"
        inside = ""
        if len(vals) >= 1:
            g = math.exp(statistics.fmean(math.log(v) for v in vals))
            inside = " (inside the predicted interval)" if law["lo"] <= g <= law["hi"] else \
                " (outside the predicted interval)"
        parts.append(f"vs {yard}: predicted {law['predicted']:.2f}x [{law['lo']:.2f}, {law['hi']:.2f}], measured "
                     f"{measured}{inside}")
    return (f"**Prediction for {study.name}** (made {pred['made']} at commit {pred['commit']}, from the law over "
            f"{', '.join(pred['laws']['target']['studies'])}, before the study ran): " + "; ".join(parts) + ".")


def regime_plot(points: list[Point], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not any(p.target or p.frontier for p in points):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    sizes = sorted({p.params for p in points})
    for ax, yard in zip(axes, YARDSTICKS):
        for i, n in enumerate(sizes):
            row = sorted((p for p in points if p.params == n and p.values(yard)), key=lambda p: p.tpp)
            if not row:
                continue
            xs = [p.tpp for p in row]
            g = [ratio_ci(p.values(yard))[0] if len(p.values(yard)) > 1 else p.values(yard)[0] for p in row]
            ax.plot(xs, g, "o-", color=f"C{i}", label=f"{row[0].shape} (N {n:,})")
            for p in row:
                ax.scatter([p.tpp] * len(p.values(yard)), p.values(yard), color=f"C{i}", s=8, alpha=0.4)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens per parameter of the target")
        ax.set_title(f"recipe vs {'target-size scratch' if yard == 'target' else 'the scratch frontier'}")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("effective compute multiplier")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
