"""A study's Handbook figure: drawn from a small fake store, its forest rows are the report's own numbers (the table's
paired differences from the reference, the baseline pairs), and a test-scored study draws the frontier's envelope."""

import math

import pytest
from test_handbook import fake_record, write_study

from nanogrow.handbook import plots, report, runner
from nanogrow.handbook.frontier import Envelope
from nanogrow.handbook.stats import fmt_ci
from nanogrow.handbook.store import Store
from nanogrow.handbook.study import _baselines, load_study

pytest.importorskip("matplotlib")

MORE = """
[arms."half at 75%"]
model = { n_layer = 2 }
stage = [{ at_frac = 0.75, shape = { n_layer = 4 } }]
"""


def seeded_record(study, run):
    """``fake_record`` with seed-dependent arm effects, so the paired intervals are finite and differ by arm."""
    rec = fake_record(study, run)
    shift = {"half at 50%": -0.02 - 0.004 * run.seed, "half at 75%": -0.05 + 0.003 * run.seed}.get(run.arm, 0.0)
    rec["curve"] = [p[:3] + [p[3] + shift] for p in rec["curve"]]
    rec["final_loss"] += shift
    rec["final_test_loss"] = rec["final_loss"] + 0.1
    return rec


def run_fake_study(tmp_path, monkeypatch, seeds=3):
    path = write_study(tmp_path, tmp_path / "data", MORE)  # (the fake runs never read the data)
    path.write_text(path.read_text().replace("seeds = [0, 1]", f"seeds = {list(range(seeds))}"))
    study = load_study(path)
    study.baseline = _baselines(tmp_path, "half at 50%", dict.fromkeys(study.arms))
    monkeypatch.setattr(runner, "execute", seeded_record)
    monkeypatch.setattr(runner, "ensure_data", lambda *a: None)
    runner.run_study(study, log=lambda *a: None)
    return study


def current_runs(study, lr):
    store = Store(study.store_path)
    return {a: [r for r in store.select(a, scale=1.0, lr=lr if a == study.reference else None)
                if r["config_hash"] in report._current_keys(study, a, r["seed"], lr)] for a in study.arms}


def test_the_forest_plots_the_tables_differences(tmp_path, monkeypatch):
    study = run_fake_study(tmp_path, monkeypatch)
    lr, _, rows = report.arm_rows(study)
    paired = report.baseline_rows(study, rows)
    drawn = plots.study_figure(study.title, study.reference, current_runs(study, lr), rows, paired,
                               tmp_path / "fig.png", budget=study.budget_flops)
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    forest = drawn["forest"]
    # vs the reference: every grown arm, lowest first, each exactly the table's "vs scratch" cell
    vs_ref = [r for r in forest if r["against"] == "scratch"]
    assert [r["arm"] for r in vs_ref] == ["half at 75%", "half at 50%"]
    table = report.table(study, rows)
    for r in vs_ref:
        assert f"| {r['arm']} | 3 | " in table and f" | {fmt_ci(r['mean'], r['lo'], r['hi'], digits=3)} | " in table
        row = next(x for x in rows if x["arm"] == r["arm"])
        assert r["mean"] == pytest.approx(sum(row["diffs"]) / 3)
    assert vs_ref[0]["mean"] == pytest.approx(-0.03 - 0.05 + 0.003)  # (the fake grown arms' 0.03, the shift)
    # vs the baseline: the baseline table's numbers, unchanged
    vs_base = [r for r in forest if r["against"] != "scratch"]
    assert vs_base == [{"arm": p["arm"], "against": p["baseline"], "seeds": p["seeds"], "mean": p["mean"],
                        "lo": p["lo"], "hi": p["hi"]} for p in paired]
    assert [r["arm"] for r in vs_base] == ["half at 75%"] and vs_base[0]["against"] == "half at 50%"
    # every arm its own look
    looks = [(s["color"], s["marker"], s["ls"]) for s in drawn["arms"].values()]
    assert len(set(looks)) == len(looks) == 3


def test_the_report_writes_the_figure_next_to_the_study(tmp_path, monkeypatch):
    study = run_fake_study(tmp_path, monkeypatch, seeds=2)
    md = report.study_markdown(study, plots=True)
    png = tmp_path / "plots" / "s.png"
    assert png.exists() and f"]({png})" in md


def test_a_test_scored_study_draws_the_frontier_envelope(tmp_path, monkeypatch):
    study = run_fake_study(tmp_path, monkeypatch)
    lr, _, rows = report.arm_rows(study)
    b = study.budget_flops
    env = Envelope([b / 4, b * 2], [5.2, 4.7], [(5.1, 5.3), (4.6, 4.8)], ["a", "b"], [True, True])
    drawn = plots.study_figure(study.title, study.reference, current_runs(study, lr), rows, [], tmp_path / "f.png",
                               score="final_test_loss", envelope=env, budget=b)
    assert drawn["path"].exists() and all(r["against"] == "scratch" for r in drawn["forest"])


def test_the_forest_scale_leaves_out_a_far_row():
    rows = [{"mean": m, "lo": m - 0.01, "hi": m + 0.01} for m in (-0.03, 0.02, 1.1)]
    lo, hi = plots._limits(rows)
    assert lo < -0.04 and 0.03 < hi < 0.1  # the 1.1 row is clipped to an arrow, not the scale
    one_seed = [{"mean": 0.01, "lo": -math.inf, "hi": math.inf}, {"mean": -0.02, "lo": -0.03, "hi": -0.01}]
    assert all(math.isfinite(v) for v in plots._limits(one_seed))


def test_arm_looks_do_not_repeat():
    looks = [tuple(plots.arm_style(i).values()) for i in range(40)]
    assert len(set(looks)) == 40
