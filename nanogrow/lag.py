"""LAG, Landscape-Aware Growing (Karp et al., seed 004): fork candidate growth operators from the same small model,
train each for k steps on identical batches, keep the one with the lowest loss at step k on held-out batches (a
slice of the training stream the run never trains on; never the validation data that scores the result).

``strategy = "halving"`` spends the same selection budget (n candidates x k steps) as successive halving, a bandit
over the candidates (Karnin et al. 2013; Jamieson & Talwalkar 2016): every candidate trains a few steps, the
better half goes on training from where it stopped, and so on until one is left, so that most of the budget goes
to the contenders and the winner has trained longer than k steps when the run continues from it.

This module knows nothing of the trainer. ``select`` receives a function that trains one candidate k steps and
returns its held-out losses (one per scoring); it decides, and hands back what the trainer needs to continue
from the winner. The analysis functions (correlations, recall@k, regret) implement section 3.3 and eq. 1-2 of the
paper on the recorded curves of all candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .grow.depth import lag_design_space


@dataclass
class Candidate:
    op: str
    options: dict = field(default_factory=dict)

    def name(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.op}({opts})"

    def to_dict(self) -> dict:
        return {"op": self.op, "options": dict(self.options)}


@dataclass
class LagResult:
    winner: int  # index into the candidates
    curves: list[list[float]]  # held-out losses of every candidate at every scoring after growing
    states: Any = None  # the winner's state, as returned by the train function (to continue from it)

    def to_dict(self, candidates: list[Candidate]) -> dict:
        return {"winner": self.winner, "candidates": [c.to_dict() for c in candidates], "curves": self.curves}


def default_candidates(old_layers: int, new_layers: int, inits=("copy", "random")) -> list[Candidate]:
    """The LAG depth design space (start index x block size x init) for old_layers -> new_layers."""
    return [Candidate("lag", dict(d)) for d in lag_design_space(old_layers, new_layers, tuple(inits))]


def select(candidates: list[Candidate], train: Callable[[int, Candidate], tuple[list[float], Any]],
           keep_state: Callable[[int, Any], None] | None = None) -> LagResult:
    """Train every candidate (``train(i, candidate) -> (val_losses, state)``) and pick the lowest last loss.
    Ties go to the earlier candidate. Only the best state so far is kept alive (memory: one extra model)."""
    if not candidates:
        raise ValueError("LAG needs at least one candidate")
    curves, best, best_state = [], None, None
    for i, cand in enumerate(candidates):
        losses, state = train(i, cand)
        if not losses:
            raise ValueError(f"LAG: candidate {cand.name()} returned no losses")
        curves.append(list(losses))
        if best is None or losses[-1] < curves[best][-1]:
            best, best_state = i, state
        else:
            del state
    return LagResult(best, curves, best_state)


STRATEGIES = ("all", "halving")


def halving_rounds(n: int, k: int) -> list[tuple[int, int]]:
    """The successive-halving schedule for ``n`` candidates and a budget of ``n * k`` candidate-steps (that of
    LAG@k): a list of (survivors, steps each) per round. ceil(log2 n) rounds; round r trains its n_r survivors
    max(1, floor(n k / (n_r R))) steps each and keeps ceil(n_r / 2). The total never exceeds n k (except where
    the 1-step floor binds, when k < R)."""
    if n < 1 or k < 1:
        raise ValueError(f"halving needs n >= 1 candidates and k >= 1 steps, got {n}, {k}")
    rounds = max(1, math.ceil(math.log2(n))) if n > 1 else 1
    out, alive = [], n
    for _ in range(rounds):
        out.append((alive, max(1, (n * k) // (alive * rounds))))
        alive = math.ceil(alive / 2)
    return out


def select_halving(candidates: list[Candidate], k: int,
                   train: Callable[[int, Candidate, int, Any], tuple[float, Any]]) -> tuple[LagResult, list[dict]]:
    """Successive halving. ``train(i, candidate, steps, state)`` trains candidate i ``steps`` more steps from
    ``state`` (None: grow it first) and returns (held-out loss, state). Survivors are the lower half by their
    latest loss (ties to the earlier candidate); losers' states are dropped once a round is ranked (memory: up to
    n candidate models in the first round, where LAG@k keeps two). Returns the result (curves: every candidate's
    losses at the end of each round it trained) and the rounds as records."""
    if not candidates:
        raise ValueError("LAG needs at least one candidate")
    schedule = halving_rounds(len(candidates), k)
    alive = list(range(len(candidates)))
    states: dict[int, Any] = {}
    curves: list[list[float]] = [[] for _ in candidates]
    rounds = []
    for r, (n_r, steps) in enumerate(schedule):
        assert n_r == len(alive)
        for i in alive:
            loss, states[i] = train(i, candidates[i], steps, states.get(i))
            curves[i].append(loss)
        ranked = sorted(alive, key=lambda i: (curves[i][-1], i))
        keep = ranked[:1] if r == len(schedule) - 1 else ranked[:math.ceil(n_r / 2)]
        rounds.append({"round": r, "steps": steps, "trained": list(alive), "kept": sorted(keep),
                       "losses": {str(i): curves[i][-1] for i in alive}})
        for i in alive:
            if i not in keep:
                del states[i]
        alive = sorted(keep)
    winner = alive[0]
    return LagResult(winner, curves, states[winner]), rounds


def select_from_losses(last_losses: list[float]) -> int:
    """The winner given every candidate's loss at step k (used when candidates ran in separate process groups)."""
    return min(range(len(last_losses)), key=lambda i: (last_losses[i], i))


def spread(xs: list[float]) -> float:
    """Sample standard deviation (nan for fewer than two values)."""
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def standard_error(xs: list[float]) -> float:
    """Standard error of the mean of ``xs`` (nan for fewer than two values)."""
    return spread(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def paired_se(result: LagResult, steps: list[int], last_batches: dict[int, list[float]]) -> float:
    """Standard error of the winner's loss minus the runner-up's, over the held-out batches both were scored on
    (this rank's): every candidate sees the same batches, so their difference is far less noisy than either
    loss. The runner-up: the lowest last loss among the candidates trained as long as the winner (under
    successive halving, the last round's other finalists). NaN if there is none."""
    w = result.winner
    rivals = [i for i, c in enumerate(result.curves) if i != w and c and steps[i] == steps[w] and i in last_batches]
    if not rivals or w not in last_batches:
        return float("nan")
    r = min(rivals, key=lambda i: result.curves[i][-1])
    return standard_error([a - b for a, b in zip(last_batches[w], last_batches[r])])


# ---- analysis (LAG paper, section 3.3) --------------------------------------------------------------------------

def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0  # average rank for ties
        i = j + 1
    return ranks


def pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def spearman(xs: list[float], ys: list[float]) -> float:
    return pearson(_ranks(xs), _ranks(ys))


def correlation_with_final(curves: list[list[float]], finals: list[float], method: str = "spearman") -> list[float]:
    """For every evaluation t after growing: correlation across candidates of loss at t with final loss."""
    f = spearman if method == "spearman" else pearson
    return [f([c[t] for c in curves], finals) for t in range(len(curves[0]))]


def correlation_heatmap(curves: list[list[float]], method: str = "spearman") -> list[list[float]]:
    """H[t1][t2] = correlation across candidates of the loss at evaluation t1 with the loss at t2."""
    f = spearman if method == "spearman" else pearson
    cols = [[c[t] for c in curves] for t in range(len(curves[0]))]
    return [[f(a, b) for b in cols] for a in cols]


def recall_at_k(curves: list[list[float]], finals: list[float], k: int) -> list[int]:
    """1 at evaluation t when the best candidate in hindsight is among the k lowest losses at t, else 0."""
    best = min(range(len(finals)), key=lambda i: finals[i])
    out = []
    for t in range(len(curves[0])):
        top = sorted(range(len(curves)), key=lambda i: (curves[i][t], i))[:k]
        out.append(int(best in top))
    return out


def regret(curves: list[list[float]], finals: list[float]) -> tuple[list[float], list[float]]:
    """LAG eq. 1-2: choosing at evaluation t the candidate g_t with the lowest loss at t,
    regret(t) = L_final(g_t) - min L_final and relative regret(t) = regret(t) / (max L_final - min L_final)."""
    lo, hi = min(finals), max(finals)
    reg, rel = [], []
    for t in range(len(curves[0])):
        g = min(range(len(curves)), key=lambda i: (curves[i][t], i))
        r = finals[g] - lo
        reg.append(r)
        rel.append(r / (hi - lo) if hi > lo else 0.0)
    return reg, rel


def first_step_above(values: list[float], threshold: float) -> int | None:
    """Index of the first evaluation whose value exceeds ``threshold`` (the paper's phase transition)."""
    for i, v in enumerate(values):
        if v == v and v > threshold:
            return i
    return None


# ---- report -----------------------------------------------------------------------------------------------------

def report(record: dict, ks: list[int] | None = None, png_prefix: str | None = None, log=print) -> dict:
    """Analysis of one LAG record whose candidates were trained to the end of their stage (``nanogrow bench lag``):
    correlation of the loss at every evaluation with the final loss, recall@k, regret and relative regret of LAG@t,
    and the evaluation where Spearman correlation first exceeds 0.8 (the paper's phase transition)."""
    names = [Candidate(c["op"], c.get("options", {})).name() for c in record["candidates"]]
    curves = record["curves"]
    finals = [c[-1] for c in curves]
    every = record.get("eval_every", 1)
    steps = [every * (t + 1) for t in range(len(curves[0]))]
    sp = correlation_with_final(curves, finals, "spearman")
    pe = correlation_with_final(curves, finals, "pearson")
    reg, rel = regret(curves, finals)
    rec1 = recall_at_k(curves, finals, 1)
    rec3 = recall_at_k(curves, finals, min(3, len(curves)))
    transition = first_step_above(sp, 0.8)
    best = min(range(len(finals)), key=lambda i: finals[i])
    log(f"{len(curves)} candidates, {steps[-1]} steps after growth; best in hindsight: {names[best]} "
        f"(final held-out loss {finals[best]:.4f}, worst {max(finals):.4f})")
    log("step | spearman | pearson | recall@1 | recall@3 | LAG@step pick | regret | relative regret")
    shown = sorted(set(ks or []) | {steps[0], steps[len(steps) // 4], steps[len(steps) // 2], steps[-1]})
    for s in shown:
        t = min(range(len(steps)), key=lambda j: abs(steps[j] - s))
        pick = min(range(len(curves)), key=lambda i: (curves[i][t], i))
        log(f"{steps[t]:>4} | {sp[t]:8.3f} | {pe[t]:7.3f} | {rec1[t]:>8} | {rec3[t]:>8} | {names[pick]:<36} | "
            f"{reg[t]:.4f} | {rel[t]:.4f}")
    log("phase transition (Spearman > 0.8 first): " + (f"step {steps[transition]} "
        f"({100 * steps[transition] / steps[-1]:.1f}% of the stage)" if transition is not None else "not reached"))
    out = {"steps": steps, "spearman": sp, "pearson": pe, "regret": reg, "relative_regret": rel,
           "recall@1": rec1, "recall@3": rec3, "transition_step": steps[transition] if transition is not None else None,
           "names": names, "finals": finals}
    if png_prefix:
        _plot_report(out, curves, png_prefix, log)
    return out


def _plot_report(out: dict, curves: list[list[float]], prefix: str, log) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install matplotlib; launch/setup.sh installs it): no plots written")
        return
    steps = out["steps"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for c, name in zip(curves, out["names"]):
        axes[0, 0].plot(steps, c, lw=0.8, label=name)
    axes[0, 0].set(xlabel="steps after growth", ylabel="held-out loss", title="candidates")
    axes[0, 0].legend(fontsize=5)
    im = axes[0, 1].imshow(correlation_heatmap(curves), origin="lower", cmap="viridis", vmin=-1, vmax=1,
                           extent=[steps[0], steps[-1], steps[0], steps[-1]])
    axes[0, 1].set(title="Spearman correlation, step x step", xlabel="step", ylabel="step")
    fig.colorbar(im, ax=axes[0, 1])
    axes[1, 0].plot(steps, out["spearman"], label="Spearman")
    axes[1, 0].plot(steps, out["pearson"], label="Pearson")
    axes[1, 0].plot(steps, out["recall@3"], label="recall@3", ls=":")
    axes[1, 0].set(xlabel="step", title="correlation with final loss")
    axes[1, 0].legend()
    axes[1, 1].plot(steps, out["relative_regret"])
    axes[1, 1].set(xlabel="LAG@step", ylabel="relative regret", title="relative regret of LAG@step")
    fig.tight_layout()
    fig.savefig(f"{prefix}.png", dpi=110)
    log(f"wrote {prefix}.png")
