"""The Handbook's study engine: statistics on hand-made curves, config hashing, the budget, the store's skip/resume,
refusals, and one real (tiny) study run end to end."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from nanogrow.config import ConfigError
from nanogrow.handbook import report, runner
from nanogrow.handbook.stats import (effective_flops, first_crossing, holm, mean_ci, paired_pvalue, ratio_ci,
                                     t975, t_pvalue)
from nanogrow.handbook.store import Store
from nanogrow.handbook.study import budget_check, config_hash, load_study

BASE = """
[model]
n_layer = 4
d_model = 32
n_head = 2
n_kv_head = 1
vocab_size = 512
max_seq_len = 32

[data]
dir = "{data}"
seq_len = 32
shuffle_block = 256

[train]
out_dir = "unused"
micro_batch = 4
max_steps = 24
warmup_steps = 2
eval_every = 4
eval_batches = 2
eval_batch_size = 4
log_every = 1000
keep_last = 1

[growth]
op = "stack"
lr_policy = "rewarm"
rewarm_steps = 2
"""

STUDY = """
[study]
title = "test study"
base = "base.toml"
seeds = [0, 1]
reference = "scratch"
lr_grid = [3e-3, 1e-2]
scratch_scales = [2]

[arms.scratch]

[arms."half at 50%"]
model = {{ n_layer = 2 }}
stage = [{{ at_frac = 0.5, shape = {{ n_layer = 4 }} }}]
{extra}
"""


def write_study(tmp_path, data, extra=""):
    (tmp_path / "base.toml").write_text(BASE.format(data=data))
    p = tmp_path / "s.toml"
    p.write_text(STUDY.format(extra=extra))
    return p


# ---- statistics ----------------------------------------------------------------------------------------------

def test_first_crossing_interpolates_between_evaluations():
    curve = [[0, 0, 0, 6.0], [10, 0, 1, 5.0], [20, 0, 3, 4.0], [30, 0, 4, 3.5]]
    assert first_crossing(curve, 4.5) == pytest.approx(15.0)
    assert first_crossing(curve, 4.5, x=2) == pytest.approx(2.0)  # seconds column
    assert first_crossing(curve, 6.5) == 0  # already there at the first evaluation
    assert first_crossing(curve, 3.0) is None  # never reached
    assert first_crossing([[0, 0, 0, 5.0], [10, 0, 1, 4.0], [20, 0, 2, 4.4], [30, 0, 3, 3.9]], 4.2) == \
        pytest.approx(8.0)  # the *first* crossing, not a later one


def test_effective_flops_interpolates_in_log_flops_and_flags_extrapolation():
    scratch = [(1e10, 5.0), (2e10, 4.6), (4e10, 4.3)]
    f, extra = effective_flops(scratch, 4.8)
    assert not extra and f == pytest.approx(math.sqrt(1e10 * 2e10))  # halfway in loss = geometric mean
    f, extra = effective_flops(scratch, 4.3)
    assert not extra and f == pytest.approx(4e10)
    f, extra = effective_flops(scratch, 4.0)  # below the 4x run: extrapolated from the last two points
    assert extra and f == pytest.approx(8e10)
    with pytest.raises(ValueError, match="two or more budgets"):
        effective_flops(scratch[:1], 4.5)


def test_confidence_intervals_on_known_values():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.303 * 1.0 / math.sqrt(3))  # t(0.975, 2) * sd / sqrt(n)
    assert mean_ci([5.0])[1:] == (-math.inf, math.inf)
    g, lo, hi = ratio_ci([2.0, 2.0, 2.0])
    assert g == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    g, lo, hi = ratio_ci([1.0, 4.0])
    assert g == pytest.approx(2.0) and lo < 1.0 < 4.0 < hi
    assert t975(40) == 1.96 and t975(11) == 2.228


# ---- studies -------------------------------------------------------------------------------------------------

def test_arms_spend_the_budget_and_hashes_identify_configs(tmp_path, demo_data):
    study = load_study(write_study(tmp_path, demo_data))
    lines = budget_check(study)
    assert len(lines) == 2 and all(l.split(", ")[-1].startswith(("1.0", "0.9")) for l in lines), lines
    for line in lines:
        assert abs(float(line.rsplit(", ", 1)[1].split(" x")[0]) - 1) < 0.05, line  # within one step of 24
    a = study.arm_config("half at 50%", 0, 1e-2)
    assert a.model.n_layer == 2 and a.stage[0].at_step > 0 and a.train.max_steps > 24 and a.train.lr == 1e-2
    assert (a.train.seed, a.data.seed, a.growth.seed) == (0, 0, 0)
    same = study.arm_config("half at 50%", 0, 1e-2)
    same.train.out_dir = "elsewhere"
    assert config_hash(same) == config_hash(a)  # where a run writes is not what it is
    # nor whether torch.compile runs it: `handbook run --compile` continues a store trained eager, and the reverse
    fast = runner.compiled(study)
    assert fast.base.train.compile and not study.base.train.compile
    assert fast.arm_config("half at 50%", 0, 1e-2).train.compile
    assert config_hash(fast.arm_config("half at 50%", 0, 1e-2)) == config_hash(a)
    assert config_hash(study.arm_config("half at 50%", 1, 1e-2)) != config_hash(a)
    assert config_hash(study.arm_config("half at 50%", 0, 3e-3)) != config_hash(a)
    edited = load_study(write_study(tmp_path, demo_data).parent / "s.toml")
    edited.arms["half at 50%"].stage[0]["at_frac"] = 0.6
    assert config_hash(edited.arm_config("half at 50%", 0, 1e-2)) != config_hash(a)  # a new arm, not mixed


def test_study_refusals_name_the_arm(tmp_path, demo_data):
    with pytest.raises(ConfigError, match=r"arm 'wide' ends in another shape than the reference 'scratch'.*n_layer"):
        load_study(write_study(tmp_path, demo_data, extra='[arms.wide]\nmodel = { n_layer = 2 }\n'))
    with pytest.raises(ConfigError, match=r"stage\[1\].at_frac=1.5 must be in \(0, 1\)"):
        load_study(write_study(tmp_path, demo_data, extra='[arms.late]\nmodel = { n_layer = 2 }\n'
                                                          'stage = [{ at_frac = 1.5, shape = { n_layer = 4 } }]\n'))
    with pytest.raises(ConfigError, match=r"arms.bad.set key 'lr'"):
        load_study(write_study(tmp_path, demo_data, extra='[arms.bad]\nset = { lr = 1 }\n'))
    p = write_study(tmp_path, demo_data)
    with pytest.raises(ValueError, match=r"no arm\(s\) \['nope'\]"):
        runner.run_study(load_study(p), arms=["nope"], log=lambda *a: None)


def fake_record(study, run):
    """A record as ``execute`` returns it, without training: the loss falls with FLOPs and with the lr."""
    flops = study.budget_flops * run.scale
    final = 5.0 - 0.1 * math.log2(run.scale) - (0.05 if run.lr == 1e-2 else 0) - 0.01 * run.seed - \
        (0.03 if run.arm != study.reference else 0)
    curve = [[flops * k / 4, 0, 10.0 * k, final + 0.5 * (4 - k) / 4] for k in range(1, 5)]
    return {"study": study.name, "arm": run.arm, "seed": run.seed, "lr": run.lr, "scale": run.scale,
            "config_hash": run.key, "curve": curve, "growth_events": [], "final_loss": final, "final_loss_se": 0.01,
            "flops": flops, "wall_seconds": 1.0, "commit": "abc", "machine": {"cpu": "test", "cores": 2, "torch": "x"}}


def test_store_skips_what_is_done_and_resumes_after_an_interruption(tmp_path, demo_data, monkeypatch):
    study = load_study(write_study(tmp_path, demo_data))
    calls = []

    def execute(study_, run):
        calls.append((run.arm, run.seed, run.lr, run.scale))
        if len(calls) == 6:
            raise KeyboardInterrupt  # the end of a working day, mid-study
        return fake_record(study_, run)

    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setattr(runner, "ensure_data", lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        runner.run_study(study, log=lambda *a: None)
    # The lr grid ran first (2 lrs x 2 seeds); the tuned lr (1e-2, lower loss) then picked the grown arm's lr.
    assert calls[:4] == [("scratch", 0, 3e-3, 1.0), ("scratch", 1, 3e-3, 1.0), ("scratch", 0, 1e-2, 1.0),
                         ("scratch", 1, 1e-2, 1.0)]
    assert calls[4] == ("half at 50%", 0, 1e-2, 1.0)
    assert len(Store(study.store_path).records) == 5
    calls.clear()
    # The rest: the grown arm's seed 1 (interrupted, so not stored) and the reference at 2x for both seeds.
    assert runner.run_study(study, log=lambda *a: None) == 3
    assert calls == [("half at 50%", 1, 1e-2, 1.0), ("scratch", 0, 1e-2, 2.0), ("scratch", 1, 1e-2, 2.0)]
    assert runner.run_study(study, log=lambda *a: None) == 0 and len(calls) == 3  # complete: nothing runs
    # A torn last line (a machine that died mid-write) is reported, not read.
    with open(study.store_path, "a") as f:
        f.write('{"arm": "scr')
    store = Store(study.store_path)
    assert store.torn == [9] and len(store.records) == 8
    lr, grid, rows = report.arm_rows(study)
    assert lr == 1e-2 and set(grid) == {3e-3, 1e-2}
    grown = next(r for r in rows if r["arm"] == "half at 50%")
    assert grown["seeds"] == 2 and grown["diffs"] == pytest.approx([-0.03, -0.03])
    assert all(r > 1 for r in grown["flops_ratio"]) and all(e > 1 for e in grown["effective"])
    md = report.study_markdown(study, plots=False)
    assert "| half at 50% | 2 |" in md and "best **0.01**" in md and "torn" in md


def test_wall_clock_ratio_pairs_only_runs_that_ran_the_same_way(tmp_path, demo_data, monkeypatch):
    """A grown arm trained under --compile beside an eager reference: the FLOPs comparison stands, the wall-clock
    ratio is not formed (compile seconds and compiled kernels are not growth's doing)."""
    study = load_study(write_study(tmp_path, demo_data))
    monkeypatch.setattr(runner, "execute", lambda st, run: {**fake_record(st, run),
                                                             "compiled": run.arm != st.reference})
    monkeypatch.setattr(runner, "ensure_data", lambda *a: None)
    runner.run_study(study, log=lambda *a: None)
    grown = next(r for r in report.arm_rows(study)[2] if r["arm"] == "half at 50%")
    assert grown["flops_ratio"] and not grown["wall_ratio"]
    said = []
    runner.compiled(study, log=said.append)  # --compile on a store with eager runs says so
    n_eager = sum(not r["compiled"] for r in Store(study.store_path).records)
    assert n_eager and len(said) == 1 and f"{n_eager} stored run(s) ran eager" in said[0]


def test_handbook_run_lines_carry_done_queued_and_eta(tmp_path, demo_data, monkeypatch):
    study = load_study(write_study(tmp_path, demo_data))
    monkeypatch.setattr(runner, "execute", fake_record)  # 1.0 wall-clock second per run
    monkeypatch.setattr(runner, "ensure_data", lambda *a: None)
    lines = []
    runner.run_study(study, log=lines.append)
    queued = [line.split(" steps | ")[1] for line in lines if "more queued" in line]
    # The lr grid (4 runs), then the grown arm and the 2x reference (4 runs): each batch's ETA from its own runs.
    assert queued == ["0 done, 3 more queued", "1 done, 2 more queued, ETA 3s", "2 done, 1 more queued, ETA 2s",
                      "3 done, 0 more queued, ETA 1s"] * 2


def test_handbook_run_of_several_studies_lines_carry_done_to_go_and_eta(tmp_path, demo_data, monkeypatch):
    write_study(tmp_path, demo_data)
    (tmp_path / "t.toml").write_text((tmp_path / "s.toml").read_text())
    studies = [load_study(tmp_path / f"{name}.toml") for name in "st"]
    monkeypatch.setattr(runner, "execute", lambda s, r: {**fake_record(s, r), "wall_seconds": 60.0})
    monkeypatch.setattr(runner, "ensure_data", lambda *a: None)
    lines = []
    assert runner.run_studies(studies, jobs=1, log=lines.append) == 16
    first_round = [line.rsplit(" | ", 1)[1] for line in lines if " to go" in line][:8]
    assert first_round[0] == "1 done, 7 to go, ETA 7m00s"
    assert first_round[-1] == "8 done, 0 to go"
    assert "[2 studies] 8 runs on 1 jobs" in lines


def test_parallel_run_lines_spread_the_eta_over_the_jobs(tmp_path, demo_data):
    """jobs > 1: each finished run's line says the runs done and to go, and an ETA of the mean run over 2 jobs (a
    stand-in pool: the real one trains in spawned processes, which a monkeypatched execute does not reach)."""
    study = load_study(write_study(tmp_path, demo_data))

    class TwoJobs:
        jobs = 2

        def run(self, items):
            for s, r in items:
                yield s, r, {**fake_record(s, r), "wall_seconds": 30.0, "jobs": 2, "threads": 1, "cpu": 0}

    lines = []
    store = Store(study.store_path)
    assert runner.run_batch(study, runner.plan_runs(study, store, study.seeds), store, log=lines.append,
                            pool=TwoJobs()) == 4
    notes = [line.rsplit(" | ", 1)[1] for line in lines if " to go" in line]
    assert notes == ["1 done, 3 to go, ETA 45s", "2 done, 2 to go, ETA 30s", "3 done, 1 to go, ETA 30s",
                     "4 done, 0 to go"]


def test_report_shows_an_arm_not_run_yet(tmp_path, demo_data, monkeypatch):
    study = load_study(write_study(tmp_path, demo_data))
    monkeypatch.setattr(runner, "execute", fake_record)
    monkeypatch.setattr(runner, "ensure_data", lambda *a: None)
    runner.run_study(study, arms=["scratch"], log=lambda *a: None)
    md = report.study_markdown(study, plots=False)
    assert "| half at 50% | 0 | not run |" in md
    assert report.completeness(study).startswith("s: 6/8 runs")  # the grown arm (2 seeds) is missing


def test_a_real_study_runs_end_to_end(tmp_path, demo_data):
    """Two tiny arms, one seed, one lr, trained for real: curves, full-validation loss with its standard error,
    growth events and the machine land in the store; the report renders."""
    p = write_study(tmp_path, demo_data)
    p.write_text(p.read_text().replace("seeds = [0, 1]", "seeds = [0]").replace("lr_grid = [3e-3, 1e-2]",
                                                                                "lr_grid = [1e-2]")
                 .replace("scratch_scales = [2]", "scratch_scales = []"))
    study = load_study(p)
    assert runner.run_study(study, log=lambda *a: None) == 2
    recs = {r["arm"]: r for r in Store(study.store_path).records}
    grown, scratch = recs["half at 50%"], recs["scratch"]
    assert grown["flops"] == pytest.approx(scratch["flops"], rel=0.05)
    assert len(grown["growth_events"]) == 1
    assert grown["growth_events"][0]["step"] == grown["config"]["stage"][0]["at_step"]
    assert grown["growth_events"][0]["op"] == "stack" and grown["growth_events"][0]["params_after"] > \
        grown["growth_events"][0]["params_before"]
    assert all(len(point) == 4 and point[2] is not None for point in grown["curve"])
    assert 0 < grown["final_loss_se"] < 0.5 and math.isfinite(grown["final_loss"])
    assert grown["machine"]["cores"] >= 1 and grown["commit"]
    json.dumps(recs)  # plain JSON
    assert "| half at 50% | 1 |" in report.study_markdown(study, plots=False)


def test_a_short_sequence_stage_is_reported_at_both_lengths(tmp_path, demo_data):
    """An arm that trains 16-token sequences before the validation length stores each stage's last loss at both
    lengths, and the report shows them per stage."""
    extra = """
[arms."seq 16 -> 32"]
set = { "data.seq_len" = 16, "train.micro_batch" = 8 }
stage = [{ at_frac = 0.5, seq_len = 32, micro_batch = 4 }]
"""
    p = write_study(tmp_path, demo_data, extra)
    p.write_text(p.read_text().replace("seeds = [0, 1]", "seeds = [0]").replace("lr_grid = [3e-3, 1e-2]",
                                                                                "lr_grid = [1e-2]")
                 .replace("scratch_scales = [2]", "scratch_scales = []"))
    study = load_study(p)
    assert runner.run_study(study, arms=["scratch", "seq 16 -> 32"], log=lambda *a: None) == 2
    rec = next(r for r in Store(study.store_path).records if r["arm"] == "seq 16 -> 32")
    first, second = rec["stages"]
    assert (first["seq_len"], second["seq_len"]) == (16, 32)
    assert math.isfinite(first["val_loss_stage_len"]) and first["val_loss_stage_len"] != first["val_loss"]
    assert second["val_loss_stage_len"] is None
    md = report.study_markdown(study, plots=False)
    assert "loss at the stage's own length" in md
    assert "| seq 16 -> 32 | 0 | 16 | " in md and f"{first['val_loss_stage_len']:.3f} |" in md


def test_a_run_stored_for_another_study_is_copied_not_rerun(tmp_path, demo_data, monkeypatch):
    first = load_study(write_study(tmp_path, demo_data))
    monkeypatch.setattr(runner, "execute", fake_record)
    monkeypatch.setattr(runner, "ensure_data", lambda *a: None)
    runner.run_study(first, arms=["scratch"], log=lambda *a: None)
    (tmp_path / "t.toml").write_text((tmp_path / "s.toml").read_text())
    second = load_study(tmp_path / "t.toml")
    trained = []
    monkeypatch.setattr(runner, "execute", lambda s, r: trained.append(r.arm) or fake_record(s, r))
    runner.run_study(second, log=lambda *a: None)
    assert trained == ["half at 50%", "half at 50%"]  # the shared reference (lr grid and 2x) came from s.jsonl
    copied = [r for r in Store(second.store_path).records if r.get("copied_from") == "s"]
    assert len(copied) == 6 and all(r["study"] == "t" for r in copied)


def test_a_copied_run_takes_this_studys_names_for_it(tmp_path, demo_data, monkeypatch):
    """The same config can be another study's 2x-budget run and this one's 1x (regime-4x16-t128's 2x scratch is
    regime-4x16-t256's 1x): the copy is filed under this study's arm, seed, lr and budget scale, so its lr grid and
    tables find it."""
    first = load_study(write_study(tmp_path, demo_data))
    monkeypatch.setattr(runner, "execute", fake_record)
    monkeypatch.setattr(runner, "ensure_data", lambda *a: None)
    runner.run_study(first, arms=["scratch"], log=lambda *a: None)
    store = Store(first.store_path)
    renamed = [{**r, "arm": "other", "scale": r["scale"] * 2, "lr": r["lr"] * 3} for r in store.records]
    first.store_path.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    (tmp_path / "t.toml").write_text((tmp_path / "s.toml").read_text())
    second = load_study(tmp_path / "t.toml")
    runner.run_study(second, log=lambda *a: None)
    copied = [r for r in Store(second.store_path).records if r.get("copied_from") == "s"]
    assert len(copied) == 6 and {r["arm"] for r in copied} == {"scratch"}
    assert {(r["lr"], r["scale"]) for r in copied} == {(r["lr"], r["scale"]) for r in store.records}
    assert runner.plan_runs(second, Store(second.store_path), second.seeds) == []


def test_ladder_trend_recovers_a_known_power_law():
    """Effective multipliers growing as N^0.3 (x2 per 10x params), with noise that cancels per rung: the fitted
    slope is 0.3 ln 10 per log10(N) and its interval is tight; a flat ladder gives a slope interval around 0."""
    rows = [{"params": n, "effective": [math.exp(0.3 * math.log(n / 1e5)) * f for f in (0.98, 1.0, 1 / 0.98)]}
            for n in (1e5, 3e5, 1e6, 3e6)]
    trend = report.fit_trend(rows)
    assert trend["b"] == pytest.approx(0.3 * math.log(10), abs=1e-3) and trend["lo"] < trend["b"] < trend["hi"]
    assert trend["hi"] - trend["lo"] < 0.1
    flat = report.fit_trend([{"params": n, "effective": [0.9, 1.1, 1.0]} for n in (1e5, 1e6)])
    assert flat["lo"] < 0 < flat["hi"]
    assert report.fit_trend([{"params": 1e5, "effective": [1.0, 2.0, 3.0]}]) is None  # one size: no trend


def test_retime_replaces_the_records_in_every_store_that_holds_them(tmp_path, demo_data, monkeypatch):
    first = load_study(write_study(tmp_path, demo_data))
    monkeypatch.setattr(runner, "execute", fake_record)
    monkeypatch.setattr(runner, "ensure_data", lambda *a: None)
    runner.run_study(first, log=lambda *a: None)
    (tmp_path / "t.toml").write_text((tmp_path / "s.toml").read_text())
    second = load_study(tmp_path / "t.toml")
    runner.run_study(second, log=lambda *a: None)  # every record copied from s
    monkeypatch.setattr(runner, "execute", lambda s, r: {**fake_record(s, r), "wall_seconds": 7.0})
    assert runner.retime(first, "scratch", log=lambda *a: None) == 2
    for study in (first, second):
        store = Store(study.store_path)
        timed = [r for r in store.records if r["arm"] == "scratch" and r["lr"] == 1e-2 and r["scale"] == 1.0]
        assert len(timed) == 2 and all(r["wall_seconds"] == 7.0 and r["retimed"] for r in timed)
        assert len(store.records) == 8 and all(r["study"] == study.name for r in store.records)


def test_a_run_the_trainer_rewrites_is_stored_under_its_planned_config(tmp_path, demo_data):
    """With train.max_flops the Trainer re-derives max_steps at a triggered growth; the record must still carry the
    planned config's hash, or the study would run it again forever."""
    p = write_study(tmp_path, demo_data, extra='[arms.plateau]\nmodel = { n_layer = 2 }\nstage = [{ shape = { '
                    'n_layer = 4 }, trigger = "plateau", trigger_options = { window = 3, threshold = 100.0, '
                    'min_steps = 4, max_steps = 20 } }]\n')
    p.write_text(p.read_text().replace("seeds = [0, 1]", "seeds = [0]").replace("lr_grid = [3e-3, 1e-2]",
                 "lr_grid = [1e-2]").replace("scratch_scales = [2]", "scratch_scales = []"))
    (tmp_path / "base.toml").write_text((tmp_path / "base.toml").read_text().replace(
        "max_steps = 24", "max_steps = 24\nmax_flops = 4.0e9"))
    study = load_study(p)
    assert runner.run_study(study, arms=["plateau"], log=lambda *a: None) == 2  # the reference, then the arm
    assert runner.run_study(study, arms=["plateau"], log=lambda *a: None) == 0


def test_lag_arm_is_scored_against_the_arms_that_apply_its_candidates(tmp_path, demo_data):
    """A LAG arm's pick is matched to the direct arm with the same plan (stack is LAG's block-2 copy here), its
    relative regret read off their final losses; the report shows picks, regret and overhead."""
    extra = """
[arms."lag b1 random"]
model = { n_layer = 2 }
stage = [{ at_frac = 0.5, shape = { n_layer = 4 }, op = "lag", options = { start = 1, block = 1, init = "random" } }]

[arms."LAG@2"]
model = { n_layer = 2 }
stage = [{ at_frac = 0.5, shape = { n_layer = 4 }, lag = { candidates = CANDIDATES, steps = 2, strategy = "halving" } }]
""".replace("CANDIDATES", '[{ op = "stack" }, { op = "lag", options = { start = 1, block = 1, init = "random" } }]')
    p = write_study(tmp_path, demo_data, extra)
    p.write_text(p.read_text().replace("seeds = [0, 1]", "seeds = [0]").replace("lr_grid = [3e-3, 1e-2]",
                                                                                "lr_grid = [1e-2]")
                 .replace("scratch_scales = [2]", "scratch_scales = []"))
    study = load_study(p)
    runner.run_study(study, log=lambda *a: None)
    store = Store(study.store_path)
    rows = report.lag_rows(study, store, 1e-2)
    assert [r["arm"] for r in rows] == ["LAG@2"]
    row = rows[0]
    finals = {r["arm"]: r["final_loss"] for r in store.records}
    assert row["picks"][0] in ("half at 50%", "lag b1 random")
    best = min(finals["half at 50%"], finals["lag b1 random"])
    spread = abs(finals["half at 50%"] - finals["lag b1 random"])
    assert row["regret"] == [pytest.approx((finals[row["picks"][0]] - best) / spread)]
    assert 0 < row["overhead"][0] < 0.2 and row["se"][0] > 0
    # The overhead is what the selection charged (its scoring passes and the losers' steps) over the run's charged
    # FLOPs, which the store keeps by category; its wall-clock share comes from the same record.
    lag_run = next(r for r in store.records if r["arm"] == "LAG@2")
    event = lag_run["growth_events"][0]["lag"]
    charged = sum(lag_run["flops_by"][c] for c in ("train", "selection", "probe", "fit"))
    assert lag_run["flops"] == pytest.approx(charged) and lag_run["flops_by"]["eval"] > 0
    assert event["selection_flops"] == pytest.approx(lag_run["flops_by"]["selection"])
    assert sum(event["score_flops_per_candidate"]) > 0
    assert row["overhead"][0] == pytest.approx(event["selection_flops"] / lag_run["flops"])
    assert row["wall_overhead"] == [pytest.approx(event["selection_seconds"] / lag_run["wall_seconds"])]
    md = report.study_markdown(study, plots=False)
    assert "| LAG@2 |" in md
    assert "FLOPs are charged FLOPs" in md and "LAG@2 selection " in md  # the decision share, said per arm


def test_preservation_line_needs_arms_grown_at_the_same_point():
    study = type("S", (), {"reference": "scratch"})()
    rows = [{"arm": f"a{i}", "seeds": 3, "jumps": [j] * 3, "diffs": [d] * 3, "grown_at": [0.75] * 3}
            for i, (j, d) in enumerate([(0.0, -0.3), (0.1, -0.25), (0.2, -0.2), (0.4, -0.1), (0.5, 0.0)])]
    line = report.preservation_line(study, rows)
    assert "rho = +1.00" in line and "significant at 95%" in line and "not significant" not in line
    rows[0]["grown_at"] = [0.25] * 3
    assert report.preservation_line(study, rows) is None


def test_t_pvalues_and_holm_match_textbook_values():
    # Two-sided p of Student's t at the 97.5% quantiles the intervals use is 0.05; t = 2, 5 df: 0.1019 (tables).
    for df in (1, 2, 3, 4, 10, 30):
        assert t_pvalue(t975(df), df) == pytest.approx(0.05, abs=2e-4)
    assert t_pvalue(2.0, 5) == pytest.approx(0.10194, abs=1e-5) and t_pvalue(0.0, 7) == pytest.approx(1.0)
    assert paired_pvalue([0.1, 0.1, 0.1]) == 0.0 and paired_pvalue([0.0, 0.0]) == 1.0
    assert math.isnan(paired_pvalue([0.3]))
    # Holm: sorted 0.01, 0.03, 0.04, 0.5 of four -> 0.04, 0.09, max(0.08, 0.09), 0.5; nan is not counted.
    got = holm([0.01, 0.04, 0.03, math.nan, 0.5])
    assert got[:3] == pytest.approx([0.04, 0.09, 0.09]) and math.isnan(got[3]) and got[4] == pytest.approx(0.5)


def test_holm_can_take_back_an_uncorrected_difference(tmp_path, demo_data):
    """Among many comparisons, one whose interval barely excludes zero is reported "before Holm" only."""
    study = load_study(write_study(tmp_path, demo_data))
    from nanogrow.handbook.study import _baselines

    names = ["scratch", "stack", *[f"x{i}" for i in range(6)]]
    study.baseline = _baselines(tmp_path, {"x": "stack"}, dict.fromkeys(names))
    rows = [{"arm": "stack", "seeds": 3, "by_seed": {0: 4.0, 1: 4.5, 2: 5.0}}]
    rows += [{"arm": f"x{i}", "seeds": 3, "by_seed": {0: 4.0 + d, 1: 4.5 + d + 0.002, 2: 5.0 + d - 0.002}}
             for i, d in enumerate([0.5, 0.008, 0.0, 0.001, -0.002, 0.003])]
    got = {r["arm"]: r for r in report.baseline_rows(study, rows)}
    assert got["x0"]["verdict"] == "higher"  # far from zero: survives the correction
    assert got["x1"]["lo"] > 0 and got["x1"]["p"] < 0.05 and got["x1"]["verdict"] == "higher before Holm"
    assert got["x2"]["verdict"] == "no difference shown"


def test_arms_are_paired_with_their_baseline_by_seed(tmp_path, demo_data):
    """study.baseline pairs grown arms with each other seed by seed: the interval is over per-seed differences, so
    a small but consistent gap is "lower" although the arms' own intervals overlap; prefixes pick the baseline."""
    from nanogrow.handbook.study import _baselines

    study = load_study(write_study(tmp_path, demo_data))
    arms = {"scratch": None, "stack": None, "stack, reset": None, "random": None, "random, reset": None}
    study.baseline = _baselines(tmp_path, {"": "stack", "random,": "random"}, arms)
    assert study.baseline_of("stack, reset") == "stack" and study.baseline_of("random, reset") == "random"
    assert study.baseline_of("stack") is None and study.baseline_of("scratch") is None
    assert study.baseline_of("random") == "stack"  # (the longest prefix it matches is "")
    rows = [{"arm": "scratch", "seeds": 3, "by_seed": {0: 5.0, 1: 5.5, 2: 6.0}},
            {"arm": "stack", "seeds": 3, "by_seed": {0: 4.0, 1: 4.5, 2: 5.0}},
            {"arm": "stack, reset", "seeds": 3, "by_seed": {0: 4.01, 1: 4.512, 2: 5.011}},
            {"arm": "random", "seeds": 2, "by_seed": {0: 4.0, 2: 5.0}},
            {"arm": "random, reset", "seeds": 3, "by_seed": {0: 4.2, 1: 4.0, 2: 4.9}}]
    got = {r["arm"]: r for r in report.baseline_rows(study, rows)}
    assert got["stack, reset"]["verdict"] == "higher" and got["stack, reset"]["mean"] == pytest.approx(0.011)
    assert got["random"]["seeds"] == 2 and got["random"]["verdict"] == "no difference shown"  # (equal on both)
    assert got["random, reset"]["seeds"] == 2 and got["random, reset"]["verdict"] == "no difference shown"
    assert "| stack, reset | stack | 3 | 0.011 [" in report.baseline_table(list(got.values()))
    with pytest.raises(ConfigError, match=r"study.baseline '' = 'nope' is not an arm"):
        _baselines(tmp_path, "nope", arms)


# ---- parallel jobs -------------------------------------------------------------------------------------------

def small_study(tmp_path, data, extra="", name="s"):
    """Two seeds, one lr, no larger budgets: two phases (the lr grid, then the grown arm) of two runs each."""
    p = write_study(tmp_path, data, extra)
    p = p.rename(tmp_path / f"{name}.toml")
    (tmp_path / "base.toml").write_text((tmp_path / "base.toml").read_text().replace("max_steps = 24",
                                                                                     "max_steps = 12"))
    p.write_text(p.read_text().replace("lr_grid = [3e-3, 1e-2]", "lr_grid = [1e-2]")
                 .replace("scratch_scales = [2]", "scratch_scales = []"))
    return load_study(p)


WALL_CLOCK = {"wall_seconds", "setup_seconds", "eval_seconds", "final_eval_seconds", "finished", "machine", "jobs",
              "threads", "cpu"}


def without_wall_clock(record):
    """A record less what depends on when and how it ran (seconds, date, machine, jobs)."""
    out = {k: v for k, v in record.items() if k not in WALL_CLOCK}
    out["curve"] = [[f, t, v] for f, t, _, v in record["curve"]]
    out["growth_events"] = [{k: v for k, v in e.items() if k != "seconds"} for e in record["growth_events"]]
    return out


@pytest.mark.skipif(len(runner.usable_cores()) < 2, reason="needs 2 cores")
def test_two_jobs_store_what_one_job_stores(tmp_path, demo_data):
    """--jobs 2 (two pinned single-thread workers) trains the same runs to the same losses as --jobs 1, and each
    record says how it ran. (The sequential side runs on 1 thread too: 2 threads are slow on a loaded 2-core
    machine, and results across thread counts are not the point here.)"""
    import torch

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, two = small_study(tmp_path / "one", demo_data), small_study(tmp_path / "two", demo_data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert runner.run_study(one, log=lambda *a: None, jobs=1) == 4
    finally:
        torch.set_num_threads(threads)
    lines = []
    assert runner.run_study(two, log=lines.append, jobs=2) == 4
    assert sum("runs ready for 2 jobs" in line for line in lines) == 2  # the lr grid, then the grown arm
    seq = {r["config_hash"]: r for r in Store(one.store_path).records}
    par = {r["config_hash"]: r for r in Store(two.store_path).records}
    assert seq.keys() == par.keys() and len(par) == 4
    for key, r in seq.items():
        assert abs(r["final_loss"] - par[key]["final_loss"]) <= 1e-6, (r["arm"], r["seed"])
        assert without_wall_clock(r) == without_wall_clock(par[key])  # same up to wall-clock fields
        assert config_hash(r["config"]) == key  # the new keys do not enter the run's key
        assert (r["jobs"], r["threads"], r["cpu"]) == (1, 1, None)
        assert (par[key]["jobs"], par[key]["threads"]) == (2, 1) and par[key]["machine"]["threads"] == 1
    assert {r["cpu"] for r in par.values()} == set(runner.usable_cores()[:2])  # each worker on its own core
    assert "| half at 50% | 2 |" in report.study_markdown(two, plots=False)  # the report ignores the new keys


@pytest.mark.skipif(len(runner.usable_cores()) < 2, reason="needs 2 cores")
def test_a_run_failing_in_a_worker_is_named_and_the_others_are_stored(tmp_path, demo_data):
    study = small_study(tmp_path, demo_data, extra='[arms.bad]\nset = { "data.dir" = "/nonexistent" }\n')
    study.seeds = [0]
    lines = []
    with pytest.raises(runner.RunFailed, match=r"s: bad \| seed 0 \| lr 0.01 \| budget x1 failed in a worker "
                                               r"process: DataError: data directory /nonexistent"):
        runner.run_study(study, log=lines.append, jobs=2)
    assert sorted(r["arm"] for r in Store(study.store_path).records) == ["half at 50%", "scratch"]
    assert any("bad | seed 0" in line and "then stopping" in line for line in lines)


def test_more_jobs_than_cores_is_refused(tmp_path, demo_data, capsys):
    from nanogrow.cli import main

    study = small_study(tmp_path, demo_data)
    n = len(runner.usable_cores())
    with pytest.raises(ValueError, match=rf"--jobs {n + 1}: this process may use {n} core\(s\).*use --jobs {n} or "
                                         r"fewer"):
        runner.run_study(study, log=lambda *a: None, jobs=n + 1)
    with pytest.raises(ValueError, match="positive integer"):
        runner.run_study(study, log=lambda *a: None, jobs=0)
    assert main(["handbook", "run", str(study.path), "--jobs", str(n + 1)]) == 2
    assert f"nanogrow: error: --jobs {n + 1}: this process may use {n} core(s)" in capsys.readouterr().err
    assert not study.store_path.exists()  # refused before anything ran


def test_store_appends_from_two_processes_are_whole_lines(tmp_path):
    """Store.append is one os.write on an O_APPEND descriptor: two processes appending 64 kB records to one store
    at once interleave whole lines."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    path = tmp_path / "s.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    store = Store(path)
    assert store.torn == [] and len(store.records) == 60
    assert sorted((r["w"], r["i"]) for r in store.records) == [(w, i) for w in range(2) for i in range(30)]
    assert all(r["pad"] == str(r["w"]) * 65536 for r in store.records)


def _append_many(path, w):
    store = Store(path)
    for i in range(30):
        store.append({"w": w, "i": i, "pad": str(w) * 65536})


def test_shipped_recipe_config_is_the_run_the_handbook_measured():
    """configs/recipe-8x96.toml resolves to the stored config of the recipe arm ("L/4 at 75%" of
    configs/handbook/recipe.toml) at the tuned lr, seed 0: the same step counts, growth step, lr and schedule, model
    and growth settings, so `nanogrow train` on it trains what the Handbook reports (issue #26). Only where the run
    writes to (out_dir, log lines, checkpoints kept) and the seeds may differ; keys the stored record predates must
    be at their defaults."""
    import dataclasses
    from pathlib import Path

    from nanogrow.config import RunConfig, StageConfig, load_config

    root = Path(__file__).resolve().parents[1]
    study = load_study(root / "configs/handbook/recipe.toml")
    store = Store(study.store_path)
    lr, _ = runner.tuned_lr(study, store, study.seeds)
    assert lr is not None
    arm = "L/4 at 75%"
    key = config_hash(study.arm_config(arm, 0, lr))
    [record] = [r for r in store.records if r["arm"] == arm and r["seed"] == 0 and r["config_hash"] == key]
    stored = record["config"]
    shipped = load_config(root / "configs/recipe-8x96.toml").to_dict()
    defaults = RunConfig().to_dict()
    stage_defaults = {f.name: f.default for f in dataclasses.fields(StageConfig)
                      if f.default is not dataclasses.MISSING}
    output_only = {"out_dir", "seed", "log_every", "keep_last"}
    for section in ("model", "data", "train", "growth"):
        for name, value in shipped[section].items():
            if name in output_only or (section == "data" and name == "dir"):
                continue
            want = stored[section].get(name, defaults[section][name])
            assert value == want, f"{section}.{name}: shipped {value!r}, measured {want!r}"
    assert len(shipped["stage"]) == len(stored["stage"])
    for got, want in zip(shipped["stage"], stored["stage"]):
        for name, value in got.items():
            measured = want[name] if name in want else stage_defaults[name]
            assert value == measured, f"stage.{name}: shipped {value!r}, measured {measured!r}"
    # the essentials spelled out, so a failure reads as the schedule it breaks
    t = shipped["train"]
    assert (t["max_steps"], t["max_flops"], shipped["stage"][0]["at_step"], shipped["stage"][0]["at_flops"]) == \
        (record["steps"], 0.0, record["growth_events"][0]["step"], -1.0)
    assert (t["lr"], t["schedule"], t["warmup_steps"], t["min_lr_ratio"]) == (lr, "cosine", 30, 0.1)
    assert (t["micro_batch"], t["grad_accum"], shipped["model"]["n_layer"], shipped["stage"][0]["shape"]) == \
        (8, 1, 2, {"n_layer": 8})


def test_lag_select_arms_follow_one_lr_schedule_up_to_the_growth(tmp_path, demo_data):
    """Every grown arm of configs/handbook/lag-select.toml, resolved by Study.arm_config and started by the Trainer
    (the LAG arms with their train.max_flops budget, which the trainer turns into a step count), has the same lr at
    every step before its growth: a FLOPs budget is planned through the known growth step, not as if all of it were
    spent at the start shape (which gave the LAG arms a longer cosine than the arms they are compared with). The
    reference trains the final shape from step 0 and has its own, shorter schedule by design."""
    from nanogrow.handbook.study import STUDY_DIR
    from nanogrow.train import Trainer

    study = load_study(STUDY_DIR / "lag-select.toml")
    lr, seed = study.lr_grid[0], study.seeds[0]
    schedules, budgeted = {}, []
    for i, name in enumerate(study.arms):
        cfg = study.arm_config(name, seed, lr)
        if not cfg.stage:
            continue
        planned = cfg.train.max_steps
        if cfg.train.max_flops:
            budgeted.append(name)
        # the study's data is not here: the demo corpus, one validation batch (neither touches the schedule)
        cfg.data.dir, cfg.train.eval_batches, cfg.train.out_dir = str(demo_data), 1, str(tmp_path / f"arm{i}")
        trainer = Trainer(cfg, log=lambda *_: None)
        growth = cfg.stage[0].at_step
        schedules[name] = (growth, trainer.max_steps, [trainer.current_lr(s) for s in range(growth)])
        assert trainer.max_steps == planned, name  # the budget buys the steps the study planned
        trainer.loader.close()
    assert len(budgeted) == 6 and len(schedules) == len(study.arms) - 1
    stack = schedules["L/2 at 75%"]
    assert stack[0] > 0 and len(set(stack[2])) > 1
    for name, schedule in schedules.items():
        assert schedule == stack, f"{name}: growth step, max_steps or lr before the growth differ from plain stacking's"


# ---- work-conserving scheduling (--jobs > 1) ----------------------------------------------------------------

def speculation_study(tmp_path, demo_data):
    """lr grid 2e-3, 4e-3, 8e-3 on tune seed 0, one extension allowed: a loss lowest at 1e-3 calls for it."""
    p = write_study(tmp_path, demo_data).parent / "s.toml"
    p.write_text(p.read_text().replace("lr_grid = [3e-3, 1e-2]", "lr_grid = [2e-3, 4e-3, 8e-3]\ntune_seeds = [0]\n"
                                       "lr_extensions = 1").replace("scratch_scales = [2]", "scratch_scales = []"))
    return load_study(p)


def lr_loss_record(study, run):
    return {**fake_record(study, run), "final_loss": 5.0 + abs(math.log2(run.lr / 1e-3)) * 0.1}


def test_speculation_asks_for_the_extension_the_finished_grid_runs_call_for(tmp_path, demo_data):
    study = speculation_study(tmp_path, demo_data)
    store = Store(study.store_path)
    spec = lambda: [(r.arm, r.seed, r.lr) for r in runner.speculative_runs(study, store, study.seeds)]  # noqa: E731
    assert spec() == []  # nothing finished
    for lr in (2e-3, 8e-3):  # the two edges: neither has its inner neighbour finished
        store.append(lr_loss_record(study, study.runs("scratch", [0], lr)[0]))
    assert spec() == []
    store.append(lr_loss_record(study, study.runs("scratch", [0], 4e-3)[0]))  # grid done: no speculation
    assert runner.lr_grid(study, store, study.seeds)[0] == [1e-3, 2e-3, 4e-3, 8e-3]  # the plan asks for it itself
    assert spec() == []

    (tmp_path / "b").mkdir()
    other = speculation_study(tmp_path / "b", demo_data)
    store = Store(other.store_path)
    for lr in (2e-3, 4e-3):  # the low edge beats its finished neighbour while 8e-3 still runs
        store.append(lr_loss_record(other, other.runs("scratch", [0], lr)[0]))
    assert [(r.seed, r.lr) for r in runner.speculative_runs(other, store, other.seeds)] == [(0, 1e-3)]
    items, copied, speculative = runner.ready_runs([(other, store, other.seeds, None)], in_flight=set())
    assert [r.lr for _, r in items] == [8e-3, 1e-3]  # the grid's own run first, then for a worker it leaves idle
    assert speculative == {items[1][1].key}
    items, _, speculative = runner.ready_runs([(other, store, other.seeds, None)], in_flight={items[0][1].key})
    assert [r.lr for _, r in items] == [1e-3] and speculative == {items[0][1].key}


class ThreadedPool(runner.RunPool):
    """The real RunPool scheduling loop (run_dynamic) on threads running a stand-in execute, so that a test sees
    when each run starts and ends (spawned workers would not see a monkeypatched execute)."""

    def __init__(self, jobs, seconds, log=print):
        super().__init__(1, log)
        self.jobs, self.seconds, self.events = jobs, seconds, []
        self._lock = threading.Lock()

    def _start(self):
        from concurrent.futures import ThreadPoolExecutor
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.jobs)
        return self._executor

    def _submit(self, executor, study, run):
        def work():
            with self._lock:
                self.events.append(("start", run.lr, run.arm))
            time.sleep(self.seconds(run))
            with self._lock:
                self.events.append(("end", run.lr, run.arm))
            return {**lr_loss_record(study, run), "threads": 1, "cpu": 0}
        return executor.submit(work)


def test_a_free_worker_trains_the_called_for_extension_while_the_grid_finishes(tmp_path, demo_data, monkeypatch):
    study = speculation_study(tmp_path, demo_data)
    study.seeds = [0]
    monkeypatch.setattr(runner, "ensure_data", lambda *a: None)
    store = Store(study.store_path)
    lines = []
    slow = {8e-3: 0.6}  # the grid's last run is slow: with phases, a core idles while it finishes
    with ThreadedPool(2, lambda r: slow.get(r.lr, 0.05) if r.arm == "scratch" else 0.05, lines.append) as pool:
        made = runner.run_scheduled(pool, [(study, store, study.seeds, None)], lines.append)
    assert made == 5  # the grid (3), its extension (1), the grown arm (1)
    ev = pool.events
    assert ev.index(("start", 1e-3, "scratch")) < ev.index(("end", 8e-3, "scratch"))  # started beside it
    assert runner.tuned_lr(study, store, study.seeds)[0] == 1e-3
    assert any("speculative" in line and "lr 0.001" in line for line in lines)
    assert {(r["arm"], r["lr"]) for r in store.records} == {("scratch", x) for x in (1e-3, 2e-3, 4e-3, 8e-3)} | \
        {("half at 50%", 1e-3)}
    assert [line.rsplit(" | ", 1)[1] for line in lines if " to go" in line][-1] == "5 done, 0 to go"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_ends_when_the_parent_is_killed(tmp_path):
    """A study stopped by SIGTERM or SIGKILL runs no cleanup: its workers must not train on, orphaned."""
    child = ("from nanogrow.handbook.runner import die_with_parent; import time; assert die_with_parent(); "
             "print('ready', flush=True); time.sleep(120)")
    parent = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}], "
              f"stdout=subprocess.PIPE, text=True); assert p.stdout.readline() == 'ready\\n'; "
              f"print(p.pid, flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{worker}/stat") as f:  # a zombie (ended, not yet reaped by init) counts as ended
            if f.read().split()[2] == "Z":
                return
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived its killed parent")
