"""The frontier's section of HANDBOOK.md: the IsoFLOP table, the L(N, D) fit with bootstrap intervals, the
compute-optimal size and tokens per parameter per budget (the fit's frontier checked against each profile's best
run), and the IsoFLOP plot."""

from __future__ import annotations

import math
from pathlib import Path

from .frontier import Envelope, Fit, Frontier, frontier_summary, interval, load_frontier
from .stats import fmt_ci, mean_ci, ratio_ci
from .markdown import figure_and_notes, rel
from .store import Store

def _ci(values: list[float], digits: int = 3, scale: float = 1.0, fmt: str = "f") -> str:
    lo, hi = interval(values)
    if math.isnan(lo):
        return "n/a"
    return f"[{lo / scale:.{digits}{fmt}}, {hi / scale:.{digits}{fmt}}]"


def _seeds(test: list[float]) -> str:
    if len(test) == 1:
        return f"{test[0]:.4f}"
    m = sum(test) / len(test)
    return f"**{m:.4f}** ({' / '.join(f'{x:.4f}' for x in test)})"


def frontier_markdown(fr: Frontier, plots: bool = True, reps: int = 200) -> str:
    store = Store(fr.store_path)
    where = rel(fr.path)
    out = [f"## {fr.title}", ""]
    if fr.question:
        out += [f"*{fr.question}*", ""]
    out += [f"Reproduce: `nanogrow handbook run {where}` (then `nanogrow handbook report`). Result store: "
            f"`{where.with_suffix('.jsonl')}`, {len(store.records)} runs."]
    s = frontier_summary(fr, store, reps)
    if store.records:
        commits, machines = store.provenance()
        out += ["", f"Commit(s) {', '.join(commits)}; machine(s) {'; '.join(machines)}. Every size is tuned over the lr "
                    f"grid {', '.join(f'{x:g}' for x in fr.lr_grid)}{_own_grids(fr)} (extended by x{fr.lr_factor:g} while the best is "
                    f"at an edge) at seed {fr.seeds[0]} on the validation split; the losses below are on the test "
                    f"split, which no choice saw. Bold: the mean over seeds {fr.seeds + fr.extra_seeds} at each "
                    f"budget's best size."]
    rows = ["| budget (FLOPs) | size | N (matmul params) | tokens | tokens / N | tuned lr | val loss | test loss |",
            "|---|---|---|---|---|---|---|---|"]
    for budget, names in fr.budgets:
        prof = s["profiles"].get(budget)
        if not prof:
            rows.append(f"| {budget:.3g} | (not run yet: {', '.join(names)}) | | | | | | |")
            continue
        complete = {p.size for p in prof["points"]} == set(names)
        for p in prof["points"]:
            mark = (" (best)" if complete else " (best of those tuned so far)") if p is prof["best"] else ""
            rows.append(f"| {budget:.3g} | {p.size}{mark} | {p.params:,} | {p.tokens:.3g} | {p.tokens / p.params:.1f} "
                        f"| {p.lr:g}{' (grid edge)' if p.edge else ''} | {p.val:.4f} | {_seeds(p.test)} |")
        missing = [n for n in names if n not in {p.size for p in prof["points"]}]
        if missing:
            rows.append(f"| {budget:.3g} | (not tuned yet: {', '.join(missing)}) | | | | | | |")
    out += ["", *rows]
    fit: Fit | None = s["fit"]
    if fit is None:
        out += ["", "The L(N, D) fit needs tuned profiles at two or more budgets: not yet."]
    else:
        boots = s["boots"]
        out += ["", f"Fit (Chinchilla form, every tuned point, test loss): L(N, D) = E + A / N^alpha + B / D^beta with "
                    f"E = {fit.E:.3f} {_ci([b.E for b in boots])}, A = {fit.A:.4g}, B = {fit.B:.4g}, "
                    f"alpha = {fit.alpha:.3f} {_ci([b.alpha for b in boots])}, "
                    f"beta = {fit.beta:.3f} {_ci([b.beta for b in boots])} (95% bootstrap intervals over the "
                    f"{len(s['points'])} points, {len(boots)} resamples). Compute-optimal size N* ~ C^a with "
                    f"a = {fit.exponent:.3f} {_ci([b.exponent for b in boots])}; FLOPs per token = "
                    f"{fit.k:.2f} N.",
                *([""] + [f"**The fit is not identified here**: an exponent above 1 (alpha {fit.alpha:.2f}, beta "
                          f"{fit.beta:.2f}) means its term is flat across the sizes measured, and its N*(C) lies outside "
                          f"every measured size; read the compute-optimal sizes off the profiles (last column), not the "
                          f"fit."] if max(fit.alpha, fit.beta) > 1 else []),
                "",
                "| budget (FLOPs) | N* (fit) | D* / N* (fit) | frontier loss (fit) | best run | its test loss | "
                "parabola through the best size and its neighbours: N*, loss, D* / N* |",
                "|---|---|---|---|---|---|---|"]
        for budget, _ in fr.budgets:
            n, d, loss = fit.frontier(budget)
            ns = [b.frontier(budget) for b in boots]
            prof = s["profiles"].get(budget)
            best = prof["best"] if prof else None
            complete = prof is not None and {p.size for p in prof["points"]} == set(dict(fr.budgets)[budget])
            par = prof["parabola"] if prof else None
            local = (f"{par[0]:,.0f}, {par[1]:.4f}, {budget / (fit.k * par[0]) / par[0]:.0f}" if par
                     else "not bracketed (the best size is an end of the profile)")
            out.append(f"| {budget:.3g} | {n:,.0f} {_ci([x[0] for x in ns], 3, fmt='g')} | {d / n:.3g} "
                       f"{_ci([x[1] / x[0] for x in ns], 3, fmt='g')} | {loss:.4f} {_ci([x[2] for x in ns], 4)} | "
                       f"{best.size + ('' if complete else ' (profile not complete)') if best else '-'} | "
                       f"{f'{best.loss:.4f}' if best else '-'} | {local} |")
    png = plot_frontier(fr, s, fr.path.parent / "plots" / f"{fr.name}.png") if plots and s["points"] else None
    return "\n".join(out + figure_and_notes(fr.title, png, fr.path))


def plot_frontier(fr: Frontier, s: dict, path: Path) -> Path | None:
    """Test loss against N, one colour and marker per budget (seed spread as error bars), the fit's IsoFLOP curve
    through each, and the fitted compute-optimal points."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap("viridis")
    markers = "osD^v<>p"
    fit: Fit | None = s["fit"]
    for i, (budget, prof) in enumerate(sorted(s["profiles"].items())):
        c = colours(i / max(1, len(s["profiles"]) - 1) * 0.85)
        pts = prof["points"]
        err = [(max(p.test) - min(p.test)) / 2 if len(p.test) > 1 else 0 for p in pts]
        ax.errorbar([p.params for p in pts], [p.loss for p in pts], yerr=err, fmt=markers[i % len(markers)],
                    color=c, label=f"C = {budget:.2g} FLOPs", capsize=3)
        if fit is not None:
            lo, hi = min(p.params for p in pts) / 1.5, max(p.params for p in pts) * 1.5
            ns = [lo * (hi / lo) ** (j / 60) for j in range(61)]
            ax.plot(ns, [fit.loss(n, budget / (fit.k * n)) for n in ns], color=c, lw=1, alpha=0.8)
            n, _, loss = fit.frontier(budget)
            if lo <= n <= hi:  # an N* far outside the sizes measured (an unidentified fit) is not drawn
                ax.plot([n], [loss], marker="*", color=c, ms=14, mec="black")
        if prof["parabola"] is not None:
            ax.plot([prof["parabola"][0]], [prof["parabola"][1]], marker="x", color=c, ms=10, mew=2)
    ax.set_xscale("log")
    ax.set_xlabel("N: parameters in matmuls (log)")
    ax.set_ylabel("test loss (nats / token)")
    ax.set_title("Scratch frontier: IsoFLOP profiles (lines: L(N, D) fit; stars: its N* where within range; "
                 "x: local parabola minimum)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_SUMMARIES: dict[tuple, dict] = {}  # (frontier path, store size) -> its summary: one fit per report


def summary_of(path: Path, reps: int = 200) -> tuple[Frontier, dict]:
    fr = load_frontier(path)
    key = (str(fr.path.resolve()), fr.store_path.stat().st_size if fr.store_path.exists() else 0, reps)
    if key not in _SUMMARIES:
        _SUMMARIES[key] = frontier_summary(fr, reps=reps)
    return fr, _SUMMARIES[key]


def yardstick_rows(study, runs_by_arm: dict[str, list[dict]], reps: int = 200) -> tuple[str, list[dict]]:
    """Each arm's runs (the study's current configs at the tuned lr, budget x1) against the measured frontier (its
    envelope: the best size per budget, joined in log-FLOPs) at their own FLOPs, on the test split: the arm's loss
    minus the frontier's, and the frontier's compute to reach the arm's loss over the arm's FLOPs (> 1: the arm
    beats the best from-scratch model of any size measured). Returns (why not, []) with fewer than two budgets."""
    fr, s = summary_of(study.frontier, reps)
    env: Envelope | None = s.get("envelope")
    if env is None:
        return f"the frontier ({fr.path.name}) has fewer than two budgets measured.", []
    rows = []
    for name, runs in runs_by_arm.items():
        runs = [r for r in runs if r.get("final_test_loss") is not None]
        if not runs:
            continue
        frontier_loss = [env.loss_at(r["flops"]) for r in runs]
        gaps = [r["final_test_loss"] - f for r, f in zip(runs, frontier_loss)]
        reach = [env.compute_for_loss(r["final_test_loss"]) for r in runs]
        mult = [c / r["flops"] for (c, _), r in zip(reach, runs)]
        mean, lo, hi = mean_ci(gaps)
        rows.append({"arm": name, "seeds": len(runs), "flops": runs[0]["flops"],
                     "test": mean_ci([r["final_test_loss"] for r in runs]), "frontier": frontier_loss[0],
                     "band": env.band_at(runs[0]["flops"]), "gap": (mean, lo, hi),
                     "mult": ratio_ci(mult) if len(mult) > 1 else (mult[0], mult[0], mult[0]),
                     "outside": env.outside(runs[0]["flops"]), "reach_outside": any(o for _, o in reach),
                     "verdict": ("beats the frontier" if hi < 0 else "loses to the frontier" if lo > 0
                                 else "no difference shown") if len(gaps) > 1 else "1 seed"})
    return "", rows


def yardstick_table(rows: list[dict]) -> str:
    lines = ["| arm | seeds | FLOPs | test loss | frontier at these FLOPs (measured, seed interval) | minus the frontier | "
             "frontier's FLOPs to reach it / the arm's | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        band = "" if math.isnan(r["band"][0]) else f" [{r['band'][0]:.3f}, {r['band'][1]:.3f}]"
        note = " (outside the frontier's budgets: extrapolated)" if r["outside"] else ""
        m = r["mult"]
        mult = f"{m[0]:.2f}x" if m[1] == m[2] else fmt_ci(*m, suffix="x")
        if r["reach_outside"]:
            mult += " (extrapolated past the budgets measured)"
        lines.append(f"| {r['arm']} | {r['seeds']} | {r['flops']:.3g} | {fmt_ci(*r['test'], digits=3)} | "
                     f"{r['frontier']:.3f}{band}{note} | {fmt_ci(*r['gap'], digits=3)} | {mult} | {r['verdict']} |")
    return "\n".join(lines)


def _own_grids(fr: Frontier) -> str:
    """The budgets tuned on a grid of their own, as a parenthesis after the common grid."""
    own = [f"{budget:.3g}: {', '.join(f'{x:g}' for x in grid)}" for budget, grid in sorted(fr.budget_lr_grids.items())]
    return f" ({'; '.join(own)})" if own else ""
