"""A study's figure in HANDBOOK.md: loss against FLOPs beside a forest plot of the paired differences.

Left, top: the end of training. Each arm's mean validation curve over its seeds against training FLOPs (log axis),
shaded from the lowest to the highest seed at each evaluation, the reference in black; tab10 colours, each arm with
its own marker and (past ten arms) line style, so no two arms look alike. The y-range starts at the highest mean loss
at 20% of the budget, so the end of training fills the panel. Studies scored on the test split add each arm's final
test loss (open marker, bar from the lowest to the highest seed) and the scratch frontier's measured envelope (dashed
black, test loss; dotted where its end segments are extended past the budgets measured). Left, bottom: the whole run,
same curves, with the legend (past 16 arms the forest's labels are the legend).

Right: the numbers the report's tables print, drawn: each arm's final loss minus the reference's, paired by seed,
mean and 95% t-interval (the mean and interval of ``report.arm_rows``' ``diffs``, as in the table's "vs scratch"
column), and below it, on its own scale, each arm minus its baseline arm (``report.baseline_rows``), each group
sorted, with a line at zero. A row lying more than 3 times as far from zero as every other is clipped to an arrow
at the edge with its numbers written.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .stats import mean_ci

MARKERS = "osD^vP*Xph<>"  # 12 markers against 10 colours: (colour, marker) repeats only after 60 arms
STYLES = ["-", "--", "-.", ":"]


def arm_style(i: int) -> dict:
    """The look of the i-th non-reference arm: a tab10 colour, a marker and a line style, unique for 40 arms."""
    return {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)], "ls": STYLES[(i // 10) % len(STYLES)]}


def forest_rows(reference: str, rows: list[dict], paired: list[dict]) -> list[dict]:
    """The forest plot's rows, top to bottom: every arm with seeds against the reference (the table's "vs scratch"
    column: mean and 95% interval of ``row["diffs"]``), lowest mean first; then every baseline pair as
    ``report.baseline_rows`` computed it, lowest first."""
    vs_ref = []
    for row in rows:
        if row["arm"] == reference or not row["seeds"]:
            continue
        mean, lo, hi = mean_ci(row["diffs"])
        vs_ref.append({"arm": row["arm"], "against": reference, "seeds": row["seeds"], "mean": mean, "lo": lo,
                       "hi": hi})
    vs_base = [{"arm": r["arm"], "against": r["baseline"], "seeds": r["seeds"], "mean": r["mean"], "lo": r["lo"],
                "hi": r["hi"]} for r in paired]
    return sorted(vs_ref, key=lambda r: r["mean"]) + sorted(vs_base, key=lambda r: r["mean"])


def mean_curve(runs: list[dict]) -> tuple[list[float], list[float], list[float], list[float]] | None:
    """(FLOPs, mean, lowest, highest validation loss over seeds) at each evaluation the runs share (same schedule,
    so the evaluations line up; FLOPs averaged, as a trigger can move them a little)."""
    n = min((len(r["curve"]) for r in runs), default=0)
    if not n:
        return None
    xs = [statistics.fmean(r["curve"][k][0] for r in runs) for k in range(n)]
    at = [[r["curve"][k][3] for r in runs] for k in range(n)]
    return xs, [statistics.fmean(v) for v in at], [min(v) for v in at], [max(v) for v in at]


def _limits(rows: list[dict]) -> tuple[float, float]:
    """The forest's x-range: every interval and zero, except a row that lies more than 3 times as far from zero as
    every other (one failed arm would squash the rest); such a row is drawn to the edge with its numbers written."""
    far = sorted(max(abs(v) for v in (r["lo"], r["hi"], r["mean"]) if math.isfinite(v)) for r in rows
                 if any(math.isfinite(v) for v in (r["lo"], r["hi"], r["mean"])))
    while len(far) >= 2 and far[-1] > 3 * far[-2]:
        far.pop()
    reach = far[-1] if far else 1.0
    ends = [v for r in rows for v in (r["lo"], r["hi"], r["mean"]) if math.isfinite(v) and abs(v) <= reach] + [0.0]
    lo, hi = min(ends), max(ends)
    pad = 0.06 * (hi - lo or 1.0)
    return lo - pad, hi + pad


def _forest(fx, rows: list[dict], styles: dict, label, open_markers: bool) -> None:
    """One group of forest rows on ``fx``, first row at the top; clipped rows end in an arrow and say their
    numbers."""
    lo_x, hi_x = _limits(rows)
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        st = styles.get(r["arm"], {"color": "grey", "marker": "o"})
        lo = max(r["lo"], lo_x) if not math.isnan(r["lo"]) else r["mean"]
        hi = min(r["hi"], hi_x) if not math.isnan(r["hi"]) else r["mean"]
        fx.plot([lo, hi], [y, y], color=st["color"], lw=2)
        if lo_x <= r["mean"] <= hi_x:
            fx.plot([r["mean"]], [y], marker=st["marker"] or "o", color=st["color"], ms=7,
                    mfc="white" if open_markers else st["color"], mew=1.5)
        if r["lo"] < lo_x or r["hi"] > hi_x:  # clipped (or a one-seed, unbounded interval): say the numbers
            edge = hi_x if r["hi"] > hi_x else lo_x
            if not lo_x <= r["mean"] <= hi_x:  # the whole row is off the scale: an arrow at the edge
                fx.plot([edge], [y], marker=">" if edge == hi_x else "<", color=st["color"], ms=9, clip_on=False)
            fx.annotate(f"{r['mean']:+.3f} [{r['lo']:.3f}, {r['hi']:.3f}]", (edge, y), xytext=(-4 if edge == hi_x
                        else 4, 5), textcoords="offset points", ha="right" if edge == hi_x else "left", fontsize=7,
                        color=st["color"])
    fx.set_xlim(lo_x, hi_x)
    fx.axvline(0, color="black", lw=1)
    fx.set_yticks(ys)
    fx.set_yticklabels([label(r) for r in rows], fontsize=7)
    fx.set_ylim(-0.7, len(rows) - 0.3)
    fx.grid(True, axis="x", alpha=0.3)


def study_figure(title: str, reference: str, runs_by_arm: dict[str, list[dict]], rows: list[dict],
                 paired: list[dict], path: Path, score: str = "final_loss", envelope=None,
                 budget: float | None = None) -> dict | None:
    """Draw the figure to ``path`` (PNG). ``runs_by_arm``: the study's current runs at the tuned lr and budget x1,
    in arm order; ``rows`` / ``paired``: ``report.arm_rows`` / ``report.baseline_rows``; ``score``: the record field
    final losses are read from; ``envelope``: the frontier's ``Envelope`` or None. Returns what was drawn
    ({"path", "forest": forest_rows(...), "arms": {arm: style}}), or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    forest = forest_rows(reference, rows, paired)
    vs_ref = [r for r in forest if r["against"] == reference]
    vs_base = [r for r in forest if r["against"] != reference]
    styles, i = {}, 0
    for name in runs_by_arm:
        if name == reference:
            styles[name] = {"color": "black", "marker": None, "ls": "-"}
        else:
            styles[name] = arm_style(i)
            i += 1
    test = score == "final_test_loss"
    split = "test" if test else "validation"
    fig = plt.figure(figsize=(15, max(8.0, 0.22 * len(forest) + 2.5)))
    longest = max((len(r["arm"]) + len(r["against"]) for r in vs_base), default=0)  # the forest's tick labels
    longest = max([longest] + [len(r["arm"]) for r in vs_ref])
    outer = fig.add_gridspec(1, 2, width_ratios=[1.25, 1], wspace=max(0.45, 0.013 * longest))
    left = outer[0].subgridspec(2, 1, height_ratios=[2.1, 1], hspace=0.3)
    ax, whole = fig.add_subplot(left[0]), fig.add_subplot(left[1])
    groups = [g for g in (vs_ref, vs_base) if g]
    right = outer[1].subgridspec(max(1, len(groups)), 1, height_ratios=[len(g) + 2 for g in groups] or [1],
                                 hspace=0.45)
    forest_axes = [fig.add_subplot(right[k]) for k in range(max(1, len(groups)))]

    # ---- left: the curves, the end of training (top) and the whole run (bottom) --------------------------------
    budget = budget or max((r["flops"] for runs in runs_by_arm.values() for r in runs), default=None)
    tops, lows, ends = [], [], []
    drawn = [name for name, runs in runs_by_arm.items() if mean_curve(runs)]
    for k, name in enumerate(drawn):
        runs = runs_by_arm[name]
        xs, ys, lo, hi = mean_curve(runs)
        st, ref = styles[name], name == reference
        for a, every in ((ax, 0.2), (whole, 0.25)):
            a.fill_between(xs, lo, hi, color=st["color"], alpha=0.12 if ref else 0.15, lw=0)
            a.plot(xs, ys, color=st["color"], ls=st["ls"], lw=2.2 if ref else 1.3, marker=st["marker"], ms=5,
                   markevery=(0.03 * (k % 7), every), zorder=3 if ref else 2,
                   label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        late = [y for x, y in zip(xs, ys) if budget and x >= 0.2 * budget]
        if late:
            tops.append(late[0])
        lows.append(min(lo))
        finals = [r[score] for r in runs if r.get(score) is not None] if test else []
        if finals:  # the test score, set off to the right of the curves' end, one column per arm
            x = statistics.fmean(r["flops"] for r in runs) * (1.02 + 0.012 * k)
            m = statistics.fmean(finals)
            ax.errorbar([x], [m], yerr=[[m - min(finals)], [max(finals) - m]], color=st["color"],
                        marker=st["marker"] or "o", mfc="white", ms=6, capsize=2, lw=1, zorder=4)
            ends.append((x, min(finals), max(finals)))
    for a in (ax, whole):
        a.set_xscale("log")
        a.grid(True, which="both", alpha=0.3)
    xmin = min((runs_by_arm[n] and mean_curve(runs_by_arm[n])[0][0] for n in drawn), default=None)
    right_x = max([budget * 1.12 if budget else 0] + [e[0] * 1.03 for e in ends])
    if envelope is not None and budget:
        lo_x = xmin or budget / 20
        grid = [lo_x * (right_x / lo_x) ** (j / 100) for j in range(101)]
        inside = [x for x in grid if not envelope.outside(x)]
        before = [x for x in grid if envelope.outside(x) and (not inside or x < inside[0])]
        after = [x for x in grid if envelope.outside(x) and inside and x > inside[-1]]
        for a in (ax, whole):
            if inside:
                a.plot(inside, [envelope.loss_at(x) for x in inside], color="black", ls="--", lw=1.4, zorder=5,
                       label="scratch frontier: measured envelope (test loss)")
            for part in (before, after):  # the end segments extended past the budgets measured
                if part:
                    a.plot(part, [envelope.loss_at(x) for x in part], color="black", ls=":", lw=1.2, zorder=5)
        lows += [envelope.loss_at(x) for x in grid if x >= 0.2 * budget]
        tops.append(envelope.loss_at(0.2 * budget))
    if tops and lows:
        top = max(tops)  # (a test score above it, an arm that failed, is in the forest and the whole run)
        bottom = min(lows + [e[1] for e in ends])
        pad = 0.04 * (top - bottom)
        ax.set_ylim(bottom - pad, top + pad)
        ax.set_xlim(0.18 * budget, right_x)
    ax.set_ylabel("validation loss")
    ax.set_xlabel("training FLOPs (log), from 18% of the budget", fontsize=8)
    ax.set_title("the end of training: mean over seeds, band from the lowest to the highest seed"
                 + ("; open markers: final test loss\n(the score; bar: seed range), against the frontier (dashed)"
                    if test else ""), fontsize=8)
    whole.set_xlabel("training FLOPs (log), the whole run", fontsize=8)
    whole.set_ylabel("validation loss", fontsize=8)
    if len(drawn) <= 16:
        whole.legend(fontsize=6.5, ncol=2 if len(drawn) > 6 else 1, loc="upper right", framealpha=0.9)
    else:  # a legend of this many arms would cover the panel: the forest's labels name each colour and marker
        whole.set_title(f"{len(drawn)} arms: each arm's colour and marker as in the forest (right); {reference} "
                        f"black", fontsize=8)

    # ---- right: the forest, each group on its own x-scale --------------------------------------------------------
    if vs_ref:
        fx = forest_axes[0]
        _forest(fx, vs_ref, styles, lambda r: f"{r['arm']} ({r['seeds']})", False)
        fx.set_title(f"final {split} loss minus {reference}'s, paired by seed: mean and 95% t-interval "
                     f"(seeds in brackets)", fontsize=8)
    if vs_base:
        fx = forest_axes[-1]
        _forest(fx, vs_base, styles, lambda r: f"{r['arm']} − {r['against']} ({r['seeds']})", True)
        fx.set_title("each arm minus its baseline arm (the study's baseline pairs), same measure", fontsize=8)
    forest_axes[-1].set_xlabel(f"difference in final {split} loss (< 0: the arm ends lower)", fontsize=8)
    if not groups:
        forest_axes[0].set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.98, top=0.92, bottom=0.07)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"path": path, "forest": forest, "arms": styles}
