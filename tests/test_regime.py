"""Part 3's regime sweep: a study's target shape and length from `model` and `tokens_per_param`, the lr tuned on a
subset of seeds over a grid extended past its best edge, other-shape arms matched in FLOPs, the growth law recovering
a known multiplier surface, and a prediction written before (and refused after) the run it predicts."""

import json
import math

import pytest

from nanogrow.config import ConfigError
from nanogrow.handbook import regime as R
from nanogrow.handbook import runner
from nanogrow.handbook.store import Store
from nanogrow.handbook.study import load_study, regime_params, run_flops

BASE = """
[model]
n_layer = 2
d_model = 32
n_head = 2
n_kv_head = 1
vocab_size = 512
max_seq_len = 32

[data]
dir = "unused-data"
seq_len = 32

[train]
out_dir = "unused"
micro_batch = 4
max_steps = 10
warmup_steps = 2
"""

STUDY = """
[study]
title = "regime point"
base = "base.toml"
model = {{ n_layer = 4, d_model = {d}, n_head = 1 }}
tokens_per_param = {tpp}
seeds = [0, 1, 2]
tune_seeds = [0]
lr_grid = [2e-3, 4e-3]
lr_extensions = {ext}
scratch_scales = [0.5, 2]
reference = "scratch"
regime_arm = "grown"
other_shapes = ["start alone"]

[arms.scratch]

[arms.grown]
model = {{ n_layer = 1 }}
stage = [{{ at_frac = 0.75, shape = {{ n_layer = 4 }} }}]

[arms."start alone"]
model = {{ n_layer = 1 }}
"""


def write_study(tmp_path, name="point", d=16, tpp=32, ext=1, **replace):
    (tmp_path / "base.toml").write_text(BASE)
    text = STUDY.format(d=d, tpp=tpp, ext=ext)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_model_and_tokens_per_param_set_the_target_and_its_length(tmp_path):
    study = load_study(write_study(tmp_path, tpp=32))
    cfg = study.arm_config("scratch", 0, 2e-3)
    assert (cfg.model.n_layer, cfg.model.d_model) == (4, 16)
    n = regime_params(study)
    assert cfg.train.max_steps == round(32 * n / (4 * 32))  # tokens = 32 N, 128 tokens per step
    # The start shape alone spends the same FLOPs in its own (cheaper) steps; the grown arm too, to a step.
    alone, grown = study.arm_config("start alone", 0, 2e-3), study.arm_config("grown", 0, 2e-3)
    assert alone.train.max_steps > cfg.train.max_steps
    for c in (alone, grown):
        assert run_flops(c) == pytest.approx(study.budget_flops, rel=0.01)


@pytest.mark.parametrize("key,value,words", [
    ("tokens_per_param = 32", "tokens_per_param = -1", "study.tokens_per_param"),
    ("tune_seeds = [0]", "tune_seeds = [7]", "study.tune_seeds"),
    ("lr_extensions = 1", "lr_extensions = 1.5", "study.lr_extensions"),
    ("scratch_scales = [0.5, 2]", "scratch_scales = [1, 2]", "study.scratch_scales"),
    ('regime_arm = "grown"', 'regime_arm = "nope"', "study.regime_arm"),
])
def test_bad_regime_keys_are_refused_by_name(tmp_path, key, value, words):
    with pytest.raises(ConfigError, match=words):
        load_study(write_study(tmp_path, **{key: value}))


def fake(study_losses):
    """An ``execute`` that scores a run by ``study_losses(study, run)`` (val and test alike)."""
    def execute(study, run):
        flops = run_flops(run.cfg)
        loss = study_losses(study, run, flops)
        return {"study": study.name, "arm": run.arm, "seed": run.seed, "lr": run.lr, "scale": run.scale,
                "config_hash": run.key, "curve": [[flops, 0, 1.0, loss]], "growth_events": [], "final_loss": loss,
                "final_loss_se": 0.01, "final_test_loss": loss, "final_test_loss_se": 0.01, "flops": flops,
                "wall_seconds": 1.0, "commit": "abc", "machine": {"cpu": "test", "cores": 1, "torch": "x"}}
    return execute


def test_the_lr_is_tuned_on_the_tune_seeds_and_the_grid_extends_past_a_best_edge(tmp_path, monkeypatch):
    study = load_study(write_study(tmp_path, ext=2))
    # Loss falls with the lr up to 1.6e-2: the grid [2e-3, 4e-3] is extended twice (8e-3, 1.6e-2), and stops there.
    losses = fake(lambda s, run, flops: 5.0 - math.log(run.lr) * 0.01 + 0.001 * run.seed
                  + (0.0 if run.arm == "scratch" else 0.1))
    monkeypatch.setattr(runner, "execute", losses)
    monkeypatch.setattr(runner, "ensure_data", lambda *_: None)
    runner.run_study(study, log=lambda *_: None)
    store = Store(study.store_path)
    grid_runs = [r for r in store.records if r["arm"] == "scratch" and r["scale"] == 1.0 and r["lr"] != 1.6e-2]
    assert sorted({r["lr"] for r in grid_runs}) == [2e-3, 4e-3, 8e-3]
    assert {r["seed"] for r in grid_runs} == {0}  # only the tuning seed runs the grid
    grid, lr, _ = runner.lr_grid(study, store, study.seeds)
    assert lr == 1.6e-2 and grid == [2e-3, 4e-3, 8e-3, 1.6e-2]
    tuned = {(r["arm"], r["seed"], r["scale"]) for r in store.records if r["lr"] == 1.6e-2}
    assert tuned == {(a, s, k) for s in (0, 1, 2) for a, k in
                     [("scratch", 1.0), ("scratch", 0.5), ("scratch", 2.0), ("grown", 1.0), ("start alone", 1.0)]}
    assert runner.plan_runs(study, store, study.seeds) == []


def surface(a, b, c):
    """Losses whose recipe multiplier against target scratch is exactly exp(a + b log10 N + c log10 tpp) per seed
    (up to a seed wobble): scratch loss = 6 - 0.2 ln(FLOPs), and the grown run ends where scratch would at m x its
    FLOPs."""
    def losses(study, run, flops):
        wobble = {0: -0.02, 1: 0.0, 2: 0.02}[run.seed]
        m = math.exp(a + b * math.log10(regime_params(study)) + c * math.log10(study.tokens_per_param) + wobble)
        if run.arm == "grown":
            flops = flops * m
        return 6.0 - 0.2 * math.log(flops) + (0.0 if run.lr == 4e-3 else 0.05) + (0.3 if run.arm == "start alone"
                                                                                    else 0.0)
    return losses


def test_the_law_recovers_a_known_multiplier_surface_and_predicts_before_the_run(tmp_path, monkeypatch):
    a, b, c = -1.2, 0.3, -0.25  # multipliers 0.77-1.0: inside the scratch runs' 0.5x-2x
    monkeypatch.setattr(runner, "execute", fake(surface(a, b, c)))
    monkeypatch.setattr(runner, "ensure_data", lambda *_: None)
    paths = [write_study(tmp_path, f"p{d}-{t}", d=d, tpp=t) for d, t in [(16, 8), (16, 32), (32, 8)]]
    studies = [load_study(p) for p in paths]
    runner.run_studies(studies, jobs=1, log=lambda *_: None)
    points = [R.regime_point(s) for s in studies]
    for p in points:
        assert len(p.values("target")) == 3 and not p.extrapolated
    law = R.fit_law(points, "target")
    assert law.terms == ["1", "log10 N", "log10 D/N"] and law.n == 9
    assert law.coef == pytest.approx([a, b, c], abs=1e-6)

    new = load_study(write_study(tmp_path, "p32-32", d=32, tpp=32))
    studies.append(new)
    with pytest.raises(ValueError, match="too few points for the law against frontier"):
        R.predict(new, studies, log=lambda *_: None)  # these studies have no frontier file
    monkeypatch.setattr(R, "YARDSTICKS", ("target",))
    path = R.predict(new, studies, log=lambda *_: None)
    pred = json.loads(path.read_text())["laws"]["target"]
    want = math.exp(a + b * math.log10(regime_params(new)) + c * math.log10(32))
    assert pred["predicted"] == pytest.approx(want, rel=1e-6) and pred["lo"] < want < pred["hi"]
    assert pred["studies"] == ["p16-32", "p16-8", "p32-8"]

    runner.run_study(new, log=lambda *_: None)
    with pytest.raises(ValueError, match="a prediction is made before the run"):
        R.predict(new, studies, log=lambda *_: None)
    md = R.regime_markdown(studies, plots=False)
    assert "**Prediction for p32-32**" in md and "(inside the predicted interval)" in md
    rows = [line for line in md.splitlines() if line.startswith("| p")]
    assert len(rows) == 4


def test_other_grown_arms_are_reported_beside_the_recipe_but_stay_out_of_the_law(tmp_path, monkeypatch):
    fresh = '\n[arms.fresh]\nmodel = { n_layer = 2 }\nstage = [{ at_frac = 0.75, shape = { n_layer = 4 } }]\n'
    study = load_study(write_study(tmp_path, **{'[arms."start alone"]': fresh + '\n[arms."start alone"]'}))
    assert "fresh" in study.arms
    base = surface(-0.1, 0.0, 0.0)
    monkeypatch.setattr(runner, "execute", fake(lambda s, run, flops: base(s, run, flops)
                                                - (0.05 if run.arm == "fresh" else 0.0)))
    monkeypatch.setattr(runner, "ensure_data", lambda *_: None)
    runner.run_study(study, log=lambda *_: None)
    point = R.regime_point(study)
    diffs, _, _ = point.variants["fresh"]
    assert sorted(diffs) == [0, 1, 2] and all(d == pytest.approx(-0.05, abs=1e-4) for d in diffs.values())
    assert list(point.variants) == ["fresh"]  # the recipe, the reference and the start shape are not variants
    md = R.regime_markdown([study], plots=False)
    assert "| point | fresh | 3 | -0.050 [-0.050, -0.050] |" in md
