"""Tables, plots and HANDBOOK.md from the result stores.

Every grown arm is compared with the tuned reference of the same seed (paired), on these measures:

  final loss        the arm's loss on the full validation set (480 sequences) at the end of the common budget,
                    and its difference from the reference's (paired by seed)
  FLOPs ratio       reference FLOPs to reach the reference's own final loss / the arm's FLOPs to reach it (first
                    crossing, interpolated between evaluations); "never" if the arm does not get there
  effective x       FLOPs the reference needs to end at the arm's final loss, read off the reference runs at
                    1x, 2x, 4x the budget (interpolated in log-FLOPs), / the arm's FLOPs
  wall ratio        as the FLOPs ratio, in wall-clock seconds (growth overhead included; evaluation time too)
  jump / next eval  validation loss just after the first growth, and at the first evaluation after it, each
                    minus the loss just before the growth

Means are over seeds with 95% t-intervals; ratios use the geometric mean and a t-interval on their logarithms.

Two more read-outs where a study has them:

  preservation      with 4 or more grown arms that grow at the same point and jump by different amounts: Spearman's rank
                    correlation, across arms, of the mean loss jump at growth with the mean final-loss difference
                    (does keeping the function at the growth step predict the end?), with its t-test
  vs baseline       with ``study.baseline``: each grown arm's final loss minus its baseline arm's, paired by seed
                    (which operator or transfer choice is better, not only which beats scratch), and whether the
                    interval excludes zero
  LAG selection     for arms that grow by LAG: each seed's pick, its relative regret (LAG paper eq. 2: the pick's
                    final loss minus the best candidate's, over the candidates' range, where each candidate's
                    final loss is that of the study's arm that applies it directly, same seed), the selection
                    overhead (the FLOPs the selection charged, every scoring pass and the losers' steps, over the
                    run's charged FLOPs; records older than the charged scoring have the losers' steps only), its
                    wall-clock (everything but the winner's own steps, over the run's seconds) and the score's
                    standard error against the candidates' spread

FLOPs are the charged FLOPs of ``metrics.CHARGED``: training, LAG selection, trigger probes and learned fitting.
Evaluation done only for reporting (the curves, the final scoring) is counted in a record's ``flops_by`` but not
charged.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

from ..lag import pearson, spearman
from ..metrics import CHARGED
from .frontier import frontiers_in
from .frontier_report import frontier_markdown, summary_of, yardstick_rows, yardstick_table
from .markdown import figure_and_notes
from .plots import study_figure
from .regime import regime_markdown
from .markdown import rel as markdown_rel
from .runner import lr_grid, plan_runs, tuned_lr
from .stats import effective_flops, first_crossing, fmt_ci, holm, mean_ci, paired_pvalue, ratio_ci, t975
from .store import Store
from .study import STUDY_DIR, Study, config_hash, studies_in

ROOT = Path(__file__).resolve().parents[2]


def score_key(study: Study) -> str:
    """The record field a study's final losses are read from: part 3's studies (those held against a frontier) are
    scored on the test split, which no tuning or selection saw; the earlier studies on validation."""
    return "final_test_loss" if study.frontier is not None else "final_loss"


def arm_rows(study: Study, store: Store | None = None) -> tuple[float | None, dict, list[dict]]:
    """(tuned lr, {lr: mean final validation loss of the reference}, one row of statistics per arm: final losses
    read from ``score_key``)."""
    store = store or Store(study.store_path)
    key = score_key(study)
    lr, grid = tuned_lr(study, store, study.seeds)
    if lr is None:
        return None, grid, []
    ref = {r["seed"]: r for r in store.select(study.reference, scale=1.0, lr=lr)}
    scales = {s: [r for r in store.select(study.reference, lr=lr) if r["seed"] == s] for s in ref}
    rows = []
    for name in study.arms:
        runs = {r["seed"]: r for r in store.select(name, scale=1.0, lr=lr if name == study.reference else None)
                if r["seed"] in ref and r["config_hash"] in _current_keys(study, name, r["seed"], lr)}
        if not runs:
            rows.append({"arm": name, "seeds": 0})
            continue
        row: dict = {"arm": name, "seeds": len(runs), "by_seed": {}, "finals": [], "diffs": [], "flops_ratio": [], "never": 0,
                     "effective": [], "extrapolated": 0, "wall_ratio": [], "jumps": [], "after": [], "rises": [],
                     "grown_at": []}
        for seed, r in sorted(runs.items()):
            base = ref[seed]
            row["finals"].append(r[key])
            row["by_seed"][seed] = r[key]
            row["diffs"].append(r[key] - base[key])
            target = base["curve"][-1][3]
            ref_cost, cost = first_crossing(base["curve"], target), first_crossing(r["curve"], target)
            if cost:
                row["flops_ratio"].append(ref_cost / cost)
                ref_s, s = first_crossing(base["curve"], target, x=2), first_crossing(r["curve"], target, x=2)
                if ref_s and s and bool(r.get("compiled")) == bool(base.get("compiled")):  # eager vs compiled: no
                    row["wall_ratio"].append(ref_s / s)
            else:
                row["never"] += 1
            points = [(x["flops"], x[key]) for x in scales[seed]]
            if len(points) >= 2:
                eff, extrapolated = effective_flops(points, r[key])
                row["effective"].append(eff / r["flops"])
                row["extrapolated"] += extrapolated
            losses = [p[3] for p in r["curve"]]
            row["rises"].append(max((b - a for a, b in zip(losses, losses[1:])), default=0.0))
            firsts = [ev["flops"] for ev in r.get("growth_events", []) if ev.get("flops") is not None]
            if firsts:
                row["grown_at"].append(firsts[0] / r["flops"])
            for ev in r.get("growth_events", []):
                if ev.get("val_loss_before") is not None and ev.get("val_loss_after") is not None:
                    row["jumps"].append(ev["val_loss_after"] - ev["val_loss_before"])
            after = loss_after_growth(r)
            if after is not None:
                row["after"].append(after)
        rows.append(row)
    return lr, grid, rows


def loss_after_growth(record: dict) -> float | None:
    """The validation loss at the first evaluation after the first growth minus the loss just before it: the spike
    the new shape and the carried optimizer state leave after a few steps (the jump at the growth step itself is
    the operator's alone)."""
    events = [ev for ev in record.get("growth_events", []) if ev.get("val_loss_before") is not None]
    if not events:
        return None
    ev = events[0]
    later = [point for point in record["curve"] if point[0] > ev["flops"] * (1 + 1e-9)]
    return later[0][3] - ev["val_loss_before"] if later else None


def _current_keys(study: Study, arm: str, seed: int, lr: float) -> set[str]:
    """Config hashes the study's current definition gives this arm (stale records of an edited arm are left out)."""
    scales = [1.0] + (study.scratch_scales if arm == study.reference else [])
    lrs = [*study.lr_grid, lr] if arm == study.reference else [lr]  # (the tuned lr may extend the grid)
    return {config_hash(study.arm_config(arm, seed, x, k)) for x in lrs for k in scales}


def fmt_ratios(values: list[float]) -> str:
    """Geometric mean and interval of ratios over seeds; with fewer than 3 values the values themselves (an
    interval from two points is wider than it is useful)."""
    if not values:
        return "n/a"
    if len(values) < 3:
        return ", ".join(f"{v:.2f}x" for v in values) + f" ({len(values)} seed{'s' if len(values) > 1 else ''})"
    return fmt_ci(*ratio_ci(values), suffix="x")


def _grown_at(fractions: list[float]) -> str:
    """Where the first growth happened, as a share of the run's FLOPs: one value for a fixed schedule, every
    seed's for a trigger."""
    if not fractions:
        return "-"
    if max(fractions) - min(fractions) < 0.01:
        return f"{100 * fractions[0]:.0f}%"
    return ", ".join(f"{100 * f:.0f}%" for f in fractions)


def table(study: Study, rows: list[dict]) -> str:
    head = ("| arm | seeds | final loss | vs scratch (paired) | FLOPs ratio to scratch's loss | effective compute x "
            "| wall-clock ratio | loss jump at growth | at the next evaluation | first growth at |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    if not any(a.stage for a in study.arms.values()):  # no growth anywhere: show how much each curve goes back up
        head = head.replace("loss jump at growth |", "largest rise between evaluations |")
        for row in rows:
            if row["seeds"]:
                row["jumps"] = row["rises"]
    lines = [head]
    for row in rows:
        if not row["seeds"]:
            lines.append(f"| {row['arm']} | 0 | not run | | | | | | | |")
            continue
        is_ref = row["arm"] == study.reference
        never = f", never in {row['never']}" if row["never"] else ""
        eff = fmt_ratios(row["effective"])
        if row["extrapolated"]:
            eff += f" ({row['extrapolated']} extrapolated)"
        lines.append(
            f"| {row['arm']} | {row['seeds']} | {fmt_ci(*mean_ci(row['finals']), digits=3)} | "
            f"{'-' if is_ref else fmt_ci(*mean_ci(row['diffs']), digits=3)} | "
            f"{'1' if is_ref else (fmt_ratios(row['flops_ratio']) if row['flops_ratio'] else 'never')}{never} | "
            f"{eff} | {'1' if is_ref else fmt_ratios(row['wall_ratio'])} | "
            f"{fmt_ci(*mean_ci(row['jumps']), digits=3) if row['jumps'] else '-'} | "
            f"{fmt_ci(*mean_ci(row['after']), digits=3) if row['after'] else '-'} | {_grown_at(row['grown_at'])} |")
    return "\n".join(lines)


def baseline_rows(study: Study, rows: list[dict]) -> list[dict]:
    """Each arm against its baseline arm (``study.baseline``): per-seed final-loss differences on the seeds both
    ran, their mean and 95% interval, the paired t-test's p-value and its Holm adjustment over the study's
    comparisons. The verdict says "lower" / "higher" where the Holm-adjusted p is below 0.05, "lower/higher before
    Holm" where only the unadjusted interval excludes zero."""
    by_arm = {r["arm"]: r for r in rows if r["seeds"]}
    out = []
    for row in rows:
        base = study.baseline_of(row["arm"])
        if base is None or not row["seeds"] or base not in by_arm:
            continue
        seeds = sorted(set(row["by_seed"]) & set(by_arm[base]["by_seed"]))
        diffs = [row["by_seed"][s] - by_arm[base]["by_seed"][s] for s in seeds]
        if not diffs:
            continue
        mean, lo, hi = mean_ci(diffs)
        out.append({"arm": row["arm"], "baseline": base, "seeds": len(diffs), "mean": mean, "lo": lo, "hi": hi,
                    "p": paired_pvalue(diffs)})
    for r, adjusted in zip(out, holm([r["p"] for r in out])):
        r["p_holm"] = adjusted
        side = "lower" if r["mean"] < 0 else "higher"
        if r["seeds"] < 2:
            r["verdict"] = "1 seed"
        elif adjusted < 0.05:
            r["verdict"] = side
        elif r["hi"] < 0 or r["lo"] > 0:
            r["verdict"] = f"{side} before Holm"
        else:
            r["verdict"] = "no difference shown"
    return out


def baseline_table(rows: list[dict]) -> str:
    lines = ["| arm | paired with | seeds | final loss minus the baseline's | p (paired t) | p, Holm over the table | "
             "verdict |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['baseline']} | {r['seeds']} | {fmt_ci(r['mean'], r['lo'], r['hi'], digits=3)} | "
              f"{_p(r['p'])} | {_p(r['p_holm'])} | {r['verdict']} |" for r in rows]
    return "\n".join(lines)


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def plot(study: Study, lr: float, path: Path, rows: list[dict], paired: list[dict],
         current: dict[str, list[dict]]) -> Path | None:
    """The study's figure (``plots.study_figure``): loss against FLOPs beside the forest plot of ``rows``' paired
    differences from the reference and ``paired``'s from each baseline; the frontier's envelope where the study has
    one."""
    envelope = summary_of(study.frontier)[1].get("envelope") if study.frontier is not None else None
    drawn = study_figure(study.title, study.reference, current, rows, paired, path, score_key(study), envelope,
                         study.budget_flops)
    return drawn["path"] if drawn else None


def preservation_line(study: Study, rows: list[dict]) -> str | None:
    """Does the loss jump at growth predict the final loss? Rank correlation across grown arms, or None."""
    grown = [r for r in rows if r["seeds"] and r["arm"] != study.reference and r["jumps"]]
    pts = [(statistics.fmean(r["jumps"]), statistics.fmean(r["diffs"])) for r in grown]
    if len(pts) < 4 or max(j for j, _ in pts) - min(j for j, _ in pts) < 1e-3:
        return None
    when = [f for r in grown for f in r["grown_at"]]
    if max(when) - min(when) > 0.02:  # growth at different times: the jump measures the timing, not the operator
        return None
    rho = spearman([j for j, _ in pts], [d for _, d in pts])
    r = pearson([j for j, _ in pts], [d for _, d in pts])
    n = len(pts)
    t = rho * math.sqrt((n - 2) / max(1e-12, 1 - rho * rho))
    verdict = "significant at 95%" if abs(t) > t975(n - 2) else "not significant at 95%"
    return (f"Function preservation: across the {n} grown arms, the mean loss jump at growth and the mean final-"
            f"loss difference have Spearman rho = {rho:+.2f} (Pearson r = {r:+.2f}; t = {t:+.2f} on {n - 2} df, "
            f"critical {t975(n - 2):.2f}): {verdict}. A positive rho means arms that keep the function better "
            f"(smaller jump) end lower.")


def _plan_fingerprint(op: str, options: dict, old_cfg, new_cfg) -> tuple:
    """What a growth plan builds, independent of the operator's name (``stack`` is LAG's block-D copy)."""
    from ..grow import make_plan

    plan = make_plan(op, old_cfg, new_cfg, **options)
    return tuple((name, tuple((p.source if isinstance(p.source, str) else ("fresh", p.source.init))
                              for p in pp.pieces)) for name, pp in sorted(plan.targets.items()))


def lag_rows(study: Study, store: Store, lr: float) -> list[dict]:
    """Per LAG arm: picks, relative regret against the study's direct arms, selection overhead, s.e. vs spread."""

    direct: dict[tuple, str] = {}
    for name, arm in study.arms.items():
        cfg = study.arm_config(name, study.seeds[0], lr)
        if len(cfg.stage) == 1 and not cfg.stage[0].lag:
            old = cfg.model
            new = dataclasses.replace(old, **cfg.stage[0].shape)
            try:
                direct[_plan_fingerprint(cfg.stage[0].op or cfg.growth.op, cfg.stage[0].options, old, new)] = name
            except ValueError:
                continue
    finals = {(r["arm"], r["seed"]): r["final_loss"] for r in store.records
              if r.get("scale", 1.0) == 1.0 and r["lr"] == lr}
    out = []
    for name in study.arms:
        cfg = study.arm_config(name, study.seeds[0], lr)
        if not any(st.lag for st in cfg.stage):
            continue
        old = cfg.model
        new = dataclasses.replace(old, **cfg.stage[0].shape)
        row = {"arm": name, "picks": [], "regret": [], "overhead": [], "wall_overhead": [], "se": [],
               "paired_se": [], "spread": []}
        keys = {k for seed in study.seeds for k in _current_keys(study, name, seed, lr)}
        for r in sorted((r for r in store.records if r["arm"] == name and r["config_hash"] in keys),
                        key=lambda r: r["seed"]):
            ev = next((e for e in r.get("growth_events", []) if e.get("lag")), None)
            if ev is None:
                continue
            lag = ev["lag"]
            cands = lag["candidates"]
            arms_of = [direct.get(_plan_fingerprint(c["op"], c.get("options", {}), old, new)) for c in cands]
            pick = arms_of[lag["winner"]] or f"candidate {lag['winner']}"
            row["picks"].append(pick)
            hind = [finals.get((a, r["seed"])) for a in arms_of]
            if all(h is not None for h in hind) and max(hind) > min(hind):
                row["regret"].append((hind[lag["winner"]] - min(hind)) / (max(hind) - min(hind)))
            f = lag["flops_per_candidate"]
            charged = lag.get("selection_flops", sum(f) - f[lag["winner"]])  # older records: the losers' steps
            row["overhead"].append(charged / r["flops"])
            if lag.get("selection_seconds") is not None and r.get("wall_seconds"):
                row["wall_overhead"].append(lag["selection_seconds"] / r["wall_seconds"])
            se = [x for x in lag.get("last_se") or [] if x is not None and x == x]
            if se:
                row["se"].append(statistics.fmean(se))
            if lag.get("paired_se") is not None and lag["paired_se"] == lag["paired_se"]:
                row["paired_se"].append(lag["paired_se"])
            last = [x for x in lag["last_losses"] if x is not None]
            if len(last) > 1:
                row["spread"].append(statistics.stdev(last))
        out.append(row)
    return out


def stage_len_rows(study: Study, store: Store, lr: float) -> list[dict]:
    """Per arm with a stage shorter than the validation length: each stage's last evaluation at the validation
    length and at the stage's own sequence length, over seeds (records written before runs stored their stages
    are left out)."""
    out = []
    for name in study.arms:
        keys = {k for seed in study.seeds for k in _current_keys(study, name, seed, lr)}
        recs = [r for r in store.records if r["arm"] == name and r["config_hash"] in keys and r.get("stages")]
        if not any(st.get("val_loss_stage_len") is not None for r in recs for st in r["stages"]):
            continue
        for i in range(max(len(r["stages"]) for r in recs)):
            stages = [r["stages"][i] for r in recs if len(r["stages"]) > i]
            own = [st["val_loss_stage_len"] for st in stages if st.get("val_loss_stage_len") is not None]
            at_val = [st["val_loss"] for st in stages if st.get("val_loss") is not None]
            out.append({"arm": name, "stage": i, "seq_len": stages[0].get("seq_len"), "shape": stages[0].get("shape"),
                        "val": at_val, "own": own})
    return out


def stage_len_table(rows: list[dict]) -> str:
    def cell(xs: list[float]) -> str:
        if not xs:
            return "-"
        return fmt_ci(*mean_ci(xs), digits=3) if len(xs) > 1 else f"{xs[0]:.3f}"

    lines = ["| arm | stage | seq_len | shape | loss at the validation length | loss at the stage's own length | seeds |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['arm']} | {row['stage']} | {row['seq_len']} | {row['shape']} | {cell(row['val'])} | "
                     f"{cell(row['own'])} | {max(len(row['val']), len(row['own']))} |")
    return "\n".join(lines)


def charged_decisions(study: Study, store: Store, lr: float) -> dict[str, str]:
    """arm -> the mean share of its current runs' charged FLOPs that each decision category (``metrics.CHARGED``
    but training) took, for the arms that spent any; records older than the breakdown have no ``flops_by``."""
    out = {}
    for arm in study.arms:
        keys = {k for seed in study.seeds for k in _current_keys(study, arm, seed, lr)}
        runs = [r for r in store.records if r["arm"] == arm and r["config_hash"] in keys and r.get("flops_by")]
        shares = {c: statistics.fmean(r["flops_by"].get(c, 0.0) / r["flops"] for r in runs)
                  for c in CHARGED if c != "train"} if runs else {}
        if any(shares.values()):
            out[arm] = ", ".join(f"{c} {100 * v:.1f}%" for c, v in shares.items() if v)
    return out


def lag_table(rows: list[dict]) -> str:
    lines = ["| LAG arm | picks (per seed) | relative regret | selection overhead (charged FLOPs / run's) | "
             "selection wall-clock / run's | score s.e. | s.e. of winner - runner-up | candidates' spread |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        reg = fmt_ci(*mean_ci(row["regret"]), digits=2) if len(row["regret"]) > 1 else (
            f"{row['regret'][0]:.2f}" if row["regret"] else "n/a (candidates' direct arms missing)")
        head = f"| {row['arm']} | {', '.join(row['picks']) or '-'} | {reg} | "
        if not (row["overhead"] and row["se"] and row["spread"]):
            lines.append(head + "- | - | - | - | - |")
            continue
        paired = f"{statistics.fmean(row['paired_se']):.1e}" if row["paired_se"] else "not recorded"
        wall = f"{100 * statistics.fmean(row['wall_overhead']):.1f}%" if row["wall_overhead"] else "not recorded"
        lines.append(head + f"{100 * statistics.fmean(row['overhead']):.1f}% | {wall} | "
                            f"{statistics.fmean(row['se']):.4f} | {paired} | {statistics.fmean(row['spread']):.4f} |")
    lines += ["", "Selection overhead: every candidate's scoring passes (on held-out training batches; records from "
                  "before that, scored on validation data, charged only the losers' steps) and the losing candidates' "
                  "steps, over the run's charged FLOPs (training, selection, trigger probes, learned fitting; "
                  "evaluation for reporting is not charged)."]
    return "\n".join(lines)


def study_markdown(study: Study, plots: bool = True) -> str:
    store = Store(study.store_path)
    lr, grid, rows = arm_rows(study, store)
    rel = markdown_rel(study.path)
    out = [f"## {study.title}", ""]
    if study.question:
        out += [f"*{study.question}*", ""]
    out += [f"Reproduce: `nanogrow handbook run {rel}` (then `nanogrow handbook report`). "
            f"Result store: `{Path(rel).with_suffix('.jsonl')}`, {len(store.records)} runs."]
    if store.torn:
        out.append(f"(lines {store.torn} of the store are torn and were skipped)")
    if lr is None:
        done = {k: f"{v:.4f}" for k, v in grid.items()}
        return "\n".join(out + ["", f"Incomplete: the reference's lr grid is not done for seeds {study.seeds} "
                                    f"(done: {done or 'none'})."])
    commits, machines = store.provenance()
    ref = store.select(study.reference, scale=1.0, lr=lr)
    split = "test" if score_key(study) == "final_test_loss" else "validation"
    se = statistics.fmean(r[f"{score_key(study)}_se"] for r in ref)
    out += ["", f"Budget: {study.budget_flops:.3e} FLOPs (the reference, {study.base.train.max_steps} steps). "
                f"Reference tuned over lr {', '.join(f'{k:g} ({v:.4f})' for k, v in grid.items())}: best **{lr:g}**; "
                f"grown arms train at it. Seeds {study.seeds} (paired: same data order and initial weights per "
                f"seed). Commit(s) {', '.join(commits)}; machine(s) {'; '.join(machines)}.",
            "", table(study, rows), "",
            f"Final losses are on 480 {split} sequences; their standard error over the 15 batches is {se:.3f}, "
            f"but every run is scored on the same sequences, so the paired differences in the table are far more "
            f"precise than that (their interval is over seeds). Intervals: 95% t over seeds; ratios: geometric "
            f"mean. Loss jump at growth: validation loss just after the growth step minus just before (the "
            f"operator's alone); at the next evaluation: the first evaluation after the growth minus just before "
            f"(what the new shape, the carried optimizer state and the lr do in the first steps). "
            f"Effective compute: from the reference at "
            f"{', '.join(['1'] + [f'{k:g}' for k in study.scratch_scales])}x the budget."]
    current = {name: [r for r in store.select(name, scale=1.0, lr=lr if name == study.reference else None)
                      if r["config_hash"] in _current_keys(study, name, r["seed"], lr)] for name in study.arms}
    decided = charged_decisions(study, store, lr)
    if decided:
        out += ["", "FLOPs are charged FLOPs: training and everything computed to decide (mean share of the run: "
                    + "; ".join(f"{arm} {parts}" for arm, parts in decided.items())
                    + "). Evaluation for reporting (the curves, the final scoring) is counted apart and not charged."]
    if study.frontier is not None:
        why, yard = yardstick_rows(study, current)
        out += ["", f"Against the scratch frontier (`{study.frontier.name}`: the best from-scratch model of any size "
                    f"measured, at the same FLOPs: each budget's best size joined in log-FLOPs, an upper bound on the "
                    f"true frontier; test split): " + (why or ""), ""]
        if yard:
            out += [yardstick_table(yard)]
    paired = baseline_rows(study, rows)
    if paired:
        out += ["", "Arms against each other (paired by seed; \"lower\" / \"higher\": the paired t-test rejects "
                    "\"no difference\" at 5% after Holm's correction over this table's comparisons; \"before Holm\": "
                    "only the uncorrected 95% interval excludes zero):",
                "", baseline_table(paired)]
    line = preservation_line(study, rows)
    if line:
        out += ["", line]
    per_stage = stage_len_rows(study, store, lr)
    if per_stage:
        out += ["", "Each stage's last evaluation, at the validation length and at the stage's own sequence length "
                    "(\"-\" where they are the same):", "", stage_len_table(per_stage)]
    lag = lag_rows(study, store, lr)
    if lag:
        out += ["", lag_table(lag)]
    png = plot(study, lr, study.path.parent / "plots" / f"{study.name}.png", rows, paired, current) if plots else None
    return "\n".join(out + figure_and_notes(study.title, png, study.path))


def ladder_rows(studies: list[Study]) -> list[dict]:
    """One row per rung (a study with ``ladder_arm``): size, budget, and the rung arm's per-seed ratios."""
    rows = []
    for study in studies:
        if not study.ladder_arm:
            continue
        lr, _, arm_stats = arm_rows(study)
        row = next((r for r in arm_stats if r["arm"] == study.ladder_arm), None)
        m = study.base.model.resolved()
        rows.append({"study": study.name, "shape": f"{m.n_layer} x {m.d_model}", "params": m.num_params(False),
                     "budget": study.budget_flops, "lr": lr, "seeds": row["seeds"] if row else 0,
                     "effective": row["effective"] if row else [], "flops_ratio": row["flops_ratio"] if row else [],
                     "diffs": row["diffs"] if row else []})
    return sorted(rows, key=lambda r: r["params"])


def fit_trend(rows: list[dict]) -> dict | None:
    """log(effective multiplier) = a + b log10(N), least squares over every seed of every rung, with the slope's
    95% t-interval (n - 2 degrees of freedom)."""

    from .stats import t975
    xs, ys = [], []
    for r in rows:
        for e in r["effective"]:
            xs.append(math.log10(r["params"]))
            ys.append(math.log(e))
    n = len(xs)
    if n < 3 or len({round(x, 6) for x in xs}) < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    resid = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    se = math.sqrt(resid / (n - 2) / sxx)
    half = t975(n - 2) * se
    return {"a": a, "b": b, "lo": b - half, "hi": b + half, "n": n}


def ladder_markdown(studies: list[Study]) -> str:
    rows = ladder_rows(studies)
    if not rows:
        return ""
    out = ["## Growth scaling ladder: does the saving grow with size?", "",
           "The recipe arm of each rung against its own tuned reference, every rung trained for 0.5 tokens per "
           "non-embedding parameter. Reproduce: `nanogrow handbook run configs/handbook/<rung>.toml` for each rung "
           "below.", "",
           "| rung | shape | non-embedding params | budget FLOPs | tuned lr | seeds | effective compute x | "
           "FLOPs ratio to scratch's loss | final loss vs scratch |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['study']} | {r['shape']} | {r['params']:,} | {r['budget']:.2e} | "
                   f"{'n/a' if r['lr'] is None else format(r['lr'], 'g')} | {r['seeds']} | "
                   f"{fmt_ratios(r['effective'])} | {fmt_ratios(r['flops_ratio'])} | "
                   f"{fmt_ci(*mean_ci(r['diffs']), digits=3) if r['diffs'] else 'n/a'} |")
    trend = fit_trend(rows)
    if trend:
        out += ["", f"Trend (least squares over {trend['n']} seed-level points): ln(effective x) = "
                    f"{trend['a']:.3f} + {trend['b']:.3f} log10(N), slope 95% interval [{trend['lo']:.3f}, "
                    f"{trend['hi']:.3f}]: per 10x in non-embedding parameters the multiplier changes by a factor "
                    f"{math.exp(trend['b']):.2f} [{math.exp(trend['lo']):.2f}, {math.exp(trend['hi']):.2f}]."]
        png = ladder_plot(rows, trend, STUDY_DIR / "plots" / "ladder.png")
        if png:
            out += ["", f"![ladder]({png.resolve().relative_to(ROOT)})"]
    notes = STUDY_DIR / "ladder.md"
    if notes.exists():
        out += ["", notes.read_text().strip()]
    return "\n".join(out)


def ladder_plot(rows: list[dict], trend: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["effective"]:
            g, lo, hi = ratio_ci(r["effective"])
            ax.errorbar([r["params"]], [g], yerr=[[g - lo], [hi - g]] if hi < math.inf else None, fmt="o",
                        color="C0", capsize=3)
            ax.scatter([r["params"]] * len(r["effective"]), r["effective"], color="C0", s=8, alpha=0.4)
    xs = [min(r["params"] for r in rows), max(r["params"] for r in rows)]
    ax.plot(xs, [math.exp(trend["a"] + trend["b"] * math.log10(x)) for x in xs], color="C1",
            label=f"fit: x{math.exp(trend['b']):.2f} per 10x params")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters of the target")
    ax.set_ylabel("effective compute multiplier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def completeness(study: Study) -> str:
    store = Store(study.store_path)
    grid, lr, _ = lr_grid(study, store, study.seeds)
    tune = study.tune_seeds or study.seeds
    later = (len(study.arms) - 1 + len(study.scratch_scales)) * len(study.seeds) + len(study.seeds) - len(tune)
    total = len(grid) * len(tune) + later
    missing = len(plan_runs(study, store, study.seeds))
    if lr is None:  # grown arms wait for the tuned lr: count them as missing too
        missing += later
    return f"{study.name}: {total - missing}/{total} runs ({study.path})"


HEADER = """# The Handbook of Growing

Generated by `nanogrow handbook report` from the result stores in `configs/handbook/` (one JSON line per run:
config and its hash, commit, machine, full validation curve, growth events). Each section says the command that
reproduces it. Hand-written recommendations (from `configs/handbook/<study>.md`) follow each table and cite it; a
recommendation is written only where the interval excludes "no difference".

How to read the tables: see the docstring of `nanogrow/handbook/report.py`. Every arm spends the same training FLOPs as
the reference (to within one step), except the learned-operator arms, whose fitting steps come on top (8-11% more,
see depth-ops and width-ops); grown arms train at the reference's tuned learning rate.
"""


def write_handbook(path: str | Path = ROOT / "HANDBOOK.md", log=print) -> Path:
    parts = [HEADER]
    summary = STUDY_DIR / "summary.md"  # hand-written: the answers so far, each citing its table below
    if summary.exists():
        parts.append(summary.read_text().strip())
    for fr in frontiers_in():  # part 3's yardstick first: the growth studies are read against it
        parts.append(frontier_markdown(fr))
    studies = studies_in()
    regime = regime_markdown(studies)  # then part 3's sweep, then parts 1 and 2
    if regime:
        parts.append(regime)
        parts += [study_markdown(s) for s in studies if s.regime_arm]
    for study in studies:
        if not study.ladder_arm and not study.regime_arm:
            parts.append(study_markdown(study))
    ladder = ladder_markdown(studies)
    if ladder:
        parts.append(ladder)
        parts += [study_markdown(s) for s in studies if s.ladder_arm]
    earlier = STUDY_DIR / "earlier.md"  # hand-written: measurements made before the study engine
    if earlier.exists():
        parts.append(earlier.read_text().strip())
    path = Path(path)
    path.write_text("\n\n".join(parts).rstrip() + "\n")
    log(f"wrote {path}")
    return path
