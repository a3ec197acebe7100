"""The frontier's section of HANDBOOK.md: the IsoFLOP table, the L(N, D) fit with bootstrap intervals, the
compute-optimal size and tokens per parameter per budget (the fit's frontier checked against each profile's best
run), and the IsoFLOP plot."""

from __future__ import annotations

import math
from pathlib import Path

from .frontier import Fit, Frontier, frontier_summary, interval
from .store import Store

ROOT = Path(__file__).resolve().parents[2]


def _rel(p: Path) -> Path:
    return p.resolve().relative_to(ROOT) if p.resolve().is_relative_to(ROOT) else p


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
    rel = _rel(fr.path)
    out = [f"## {fr.title}", ""]
    if fr.question:
        out += [f"*{fr.question}*", ""]
    out += [f"Reproduce: `nanogrow handbook run {rel}` (then `nanogrow handbook report`). Result store: "
            f"`{rel.with_suffix('.jsonl')}`, {len(store.records)} runs."]
    s = frontier_summary(fr, store, reps)
    if store.records:
        commits = sorted({r["commit"][:10] for r in store.records})
        machines = sorted({f"{r['machine']['cpu']} ({r['machine']['cores']} cores, torch {r['machine']['torch']})"
                           for r in store.records})
        out += ["", f"Commit(s) {', '.join(commits)}; machine(s) {'; '.join(machines)}. Every size is tuned over the lr "
                    f"grid {', '.join(f'{x:g}' for x in fr.lr_grid)} (extended by x{fr.lr_factor:g} while the best is "
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
        for p in prof["points"]:
            mark = " (best)" if p is prof["best"] else ""
            rows.append(f"| {budget:.3g} | {p.size}{mark} | {p.params:,} | {p.tokens:.3g} | {p.tokens / p.params:.1f} "
                        f"| {p.lr:g} | {p.val:.4f} | {_seeds(p.test)} |")
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
                "",
                "| budget (FLOPs) | N* (fit) | D* / N* (fit) | frontier loss (fit) | best run | its test loss | "
                "parabola minimum (approach 2) |",
                "|---|---|---|---|---|---|---|"]
        for budget, _ in fr.budgets:
            n, d, loss = fit.frontier(budget)
            ns = [b.frontier(budget) for b in boots]
            prof = s["profiles"].get(budget)
            best = prof["best"] if prof else None
            par = prof["parabola"] if prof else None
            out.append(f"| {budget:.3g} | {n:,.0f} {_ci([x[0] for x in ns], 0)} | {d / n:.1f} "
                       f"{_ci([x[1] / x[0] for x in ns], 1)} | {loss:.4f} {_ci([x[2] for x in ns], 4)} | "
                       f"{best.size if best else '-'} | {f'{best.loss:.4f}' if best else '-'} | "
                       f"{f'N {par[0]:,.0f}, loss {par[1]:.4f}' if par else 'outside the sizes / none'} |")
    if plots and s["points"]:
        png = plot_frontier(fr, s, fr.path.parent / "plots" / f"{fr.name}.png")
        if png:
            out += ["", f"![{fr.title}]({_rel(png)})"]
    notes = fr.path.with_suffix(".md")
    if notes.exists():
        out += ["", notes.read_text().strip()]
    return "\n".join(out)


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
            ax.plot([n], [loss], marker="*", color=c, ms=14, mec="black")
    ax.set_xscale("log")
    ax.set_xlabel("N: parameters in matmuls (log)")
    ax.set_ylabel("test loss (nats / token)")
    ax.set_title("Scratch frontier: IsoFLOP profiles (lines: L(N, D) fit; stars: its compute-optimal N*)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
