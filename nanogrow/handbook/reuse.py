"""Liew & Kato's reuse law (2025), fitted on the regime sweep: at one target shape, a grown model's test loss as a
function of the tokens it saw as the start shape (D1, before growth) and as the target (D2, after):

    L(D1, D2) = E + A * D1^-a1 * D2^(-a2 + a3 ln D1)          (D in millions of tokens)

a3 > 0 means the tokens after growth buy less the longer the start model trained: reuse saturates as the base is
overtrained. The observations are every seed of every arm of the part-3 studies that grows the regime arm's start
shape to the target in one event (the recipe, L/4 at 75%, and the same growth moved to 25%, 50% and 90% of the FLOPs),
at the study's tuned lr, pooled over the lengths (tokens per parameter) of one target shape. Fitted by least squares
on the loss (L-BFGS in float64 from a grid of starts; E kept in [0, the lowest loss]); intervals: 95% percentiles of
refits on seed-resampled data (100 draws; each distinct (D1, D2) keeps its number of seeds). A fit whose E runs to
its bound is reported as not identified. The same fit with a3 = 0 (no
saturation) is reported beside it, so that a3's worth can be read from the residuals as well as from its interval.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import torch

from .stats import fmt_ci, mean_ci
from .store import Store
from .study import Study, config_hash

PARAMS = ("E", "A", "a1", "a2", "a3")
MTOK = 1e6


@dataclass
class Obs:
    study: str
    arm: str
    seed: int
    d1: float  # tokens before growth
    d2: float  # tokens after
    loss: float  # test loss


@dataclass
class ReuseFit:
    shape: str
    obs: list[Obs]
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    resid_sd: float
    resid_sd_no_a3: float

    @property
    def points(self) -> int:
        return len({(o.d1, o.d2) for o in self.obs})


def growth_arms(study: Study) -> list[str]:
    """The arms that grow the regime arm's start shape to the target in one event with the same options (the
    recipe and its growth step moved), the regime arm first."""
    ref = study.arms[study.regime_arm]

    def same_growth(spec) -> bool:
        return (spec.model == ref.model and spec.set == ref.set and len(spec.stage) == 1 == len(ref.stage)
                and {k: v for k, v in spec.stage[0].items() if k != "at_frac"}
                == {k: v for k, v in ref.stage[0].items() if k != "at_frac"})

    return [study.regime_arm] + [a for a, spec in study.arms.items() if a != study.regime_arm and same_growth(spec)]


def observations(study: Study, lr: float, store: Store | None = None) -> list[Obs]:
    store = store or Store(study.store_path)
    out = []
    for arm in growth_arms(study):
        for seed in study.seeds:
            key = config_hash(study.arm_config(arm, seed, lr))
            r = next((r for r in store.records if r["config_hash"] == key and r.get("final_test_loss") is not None
                      and r.get("growth_events")), None)
            if r is not None:
                d1 = float(r["growth_events"][0]["tokens"])
                out.append(Obs(study.name, arm, seed, d1, float(r["tokens"]) - d1, float(r["final_test_loss"])))
    return out


def _predict(x: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, e_max: float, a3: bool) -> torch.Tensor:
    e = e_max * torch.sigmoid(x[0])
    expo = -x[3] + (x[4] if a3 else 0.0) * torch.log(d1)
    return e + torch.exp(x[1] - x[2] * torch.log(d1) + expo * torch.log(d2))


def fit(obs: list[Obs], a3: bool = True, starts: list[list[float]] | None = None) -> tuple[list[float], float]:
    """(x, residual sd): x = [logit(E / lowest loss), ln A, a1, a2, a3], the least-squares fit over ``starts``."""
    d1 = torch.tensor([o.d1 / MTOK for o in obs], dtype=torch.float64)
    d2 = torch.tensor([o.d2 / MTOK for o in obs], dtype=torch.float64)
    y = torch.tensor([o.loss for o in obs], dtype=torch.float64)
    e_max = float(y.min())
    if starts is None:
        starts = [[e, 0.0, a1, a2, s3] for e, a1, a2, s3 in
                  itertools.product((0.0, 2.0), (0.1, 0.5), (0.1, 0.3, 0.6), (0.0, 0.05))]
    best, best_sse = None, math.inf
    for start in starts:
        x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([x], lr=1.0, max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            sse = ((_predict(x, d1, d2, e_max, a3) - y) ** 2).sum()
            sse.backward()
            return sse

        try:
            opt.step(closure)
        except RuntimeError:  # a start that overflows: the next one
            continue
        with torch.no_grad():
            sse = float(((_predict(x, d1, d2, e_max, a3) - y) ** 2).sum())
        if math.isfinite(sse) and sse < best_sse:
            best, best_sse = x.detach().tolist(), sse
    if best is None:
        raise ValueError("the reuse law did not fit from any start")
    dof = max(1, len(obs) - (5 if a3 else 4))
    if not a3:
        best[4] = 0.0
    return best, math.sqrt(best_sse / dof)


def readable(x: list[float], obs: list[Obs]) -> dict[str, float]:
    e_max = min(o.loss for o in obs)
    return {"E": e_max / (1 + math.exp(-x[0])), "A": math.exp(x[1]), "a1": x[2], "a2": x[3], "a3": x[4]}


def fit_reuse(shape: str, obs: list[Obs], reps: int = 100, seed: int = 0) -> ReuseFit | None:
    """The law at one target shape, or None with fewer than 6 distinct (D1, D2) points (5 parameters)."""
    groups: dict[tuple, list[Obs]] = {}
    for o in obs:
        groups.setdefault((o.d1, o.d2), []).append(o)
    if len(groups) < 6:
        return None
    x, sd = fit(obs)
    _, sd0 = fit(obs, a3=False)
    rng, draws = random.Random(seed), []
    for _ in range(reps):
        sample = [rng.choice(g) for g in groups.values() for _ in g]
        try:
            draws.append(readable(fit(sample, starts=[x])[0], sample))
        except ValueError:
            continue
    intervals = {}
    for p in PARAMS:
        vals = sorted(d[p] for d in draws)
        intervals[p] = (vals[int(0.025 * (len(vals) - 1))], vals[int(0.975 * (len(vals) - 1))]) if vals else \
            (math.nan, math.nan)
    return ReuseFit(shape, obs, readable(x, obs), intervals, sd, sd0)


def reuse_markdown(studies: list[Study], lrs: dict[str, float], reps: int = 100) -> str:
    """The fit per target shape of the regime studies (``lrs``: each study's tuned lr), and which shapes have too
    few growth points for it."""
    by_shape: dict[str, list[Obs]] = {}
    for s in studies:
        if s.regime_arm and lrs.get(s.name) is not None:
            m = s.base.model
            by_shape.setdefault(f"{m.n_layer} x {m.d_model}", []).extend(observations(s, lrs[s.name]))
    if not by_shape:
        return ""
    out = ["", "**Liew & Kato's reuse law** (`nanogrow/handbook/reuse.py`: L(D1, D2) = E + A D1^-a1 "
               "D2^(-a2 + a3 ln D1), D1 and D2 the tokens before and after growth in millions, fitted per target "
               "shape over every seed of the recipe and its growth step moved to 25%, 50% and 90%, at every length):",
           ""]
    rows = []
    for shape, obs in sorted(by_shape.items()):
        f = fit_reuse(shape, obs, reps=reps)
        n_pts = len({(o.d1, o.d2) for o in obs})
        if f is None:
            rows.append(f"- {shape}: {n_pts} distinct (D1, D2) points, fewer than the 6 a five-parameter fit needs: "
                        f"not fitted.")
            continue
        ps = ", ".join(f"{p} {f.params[p]:.3g} [{f.intervals[p][0]:.3g}, {f.intervals[p][1]:.3g}]" for p in PARAMS)
        if f.params["E"] > 0.995 * min(o.loss for o in obs):
            rows.append(f"- {shape}: {f.points} distinct (D1, D2) points, {len(obs)} runs: **not identified** (E runs "
                        f"to its bound, the lowest loss measured: {ps}; residual sd {f.resid_sd:.3f}, with a3 = 0 "
                        f"{f.resid_sd_no_a3:.3f}). The form is smooth in D2 and has no term for the loss jump at "
                        f"growth that the 90% arms never recover from in the last tenth of the budget.")
            continue
        sat = ("reuse saturates (a3 > 0: the tokens after growth buy less the longer the start trained)"
               if f.intervals["a3"][0] > 0 else
               "a3 < 0: the tokens after growth buy more the longer the start trained" if f.intervals["a3"][1] < 0
               else "a3's interval includes 0: no saturation resolved")
        rows.append(f"- {shape}: {f.points} distinct (D1, D2) points, {len(obs)} runs; {ps}; residual sd "
                    f"{f.resid_sd:.3f} (with a3 = 0: {f.resid_sd_no_a3:.3f}); {sat}.")
    return "\n".join(out + rows)


def growth_time_table(points: dict, studies: list[Study]) -> list[str]:
    """Markdown: per regime study with the recipe's growth step moved (G1 at that length), each step's test loss
    minus the target trained from scratch, mean and 95% t-interval over seeds (``points``: study name -> its
    ``regime.Point``). Empty when no study moves the step."""
    rows, fracs = [], set()
    for s in studies:
        p = points.get(s.name)
        arms = growth_arms(s) if s.regime_arm else []
        if p is None or p.lr is None or len(arms) < 2:
            continue
        cells = {}
        for arm in arms:
            d = p.diffs if arm == s.regime_arm else p.variants.get(arm, ({}, {}, set()))[0]
            if d:
                cells[s.arms[arm].stage[0].get("at_frac")] = d
        fracs |= set(cells)
        rows.append((p, cells))
    if not rows:
        return []
    fracs = sorted(f for f in fracs if f is not None)
    out = ["", "When to grow at each length (G1 in this regime): the recipe's growth step moved, the same FLOPs; "
               "test loss minus the target trained from scratch (negative: growth wins), 95% t-interval over seeds:",
           "", "| study | target | tokens/param | " + " | ".join(f"grown at {f:.0%}" for f in fracs) + " |",
           "|---|---|---|" + "---|" * len(fracs)]
    for p, cells in sorted(rows, key=lambda r: (r[0].params, r[0].tpp)):
        out.append(f"| {p.study} | {p.shape} | {p.tpp:g} | " + " | ".join(
            fmt_ci(*mean_ci(list(cells[f].values())), digits=3) + (f" ({len(cells[f])} seeds)" if len(cells[f]) < 3
                                                                   else "")
            if f in cells else "-" for f in fracs) + " |")
    return out
