"""The scratch frontier: the Chinchilla fit recovers a known law, the lr grid extends past a best edge, bad frontier
files are refused by name, and a tiny frontier runs end to end, selecting on val and reporting test."""

import math

import pytest

from nanogrow.config import ConfigError
from nanogrow.handbook import frontier as F
from nanogrow.handbook import frontier_report
from nanogrow.handbook.frontier_report import frontier_markdown
from nanogrow.handbook.store import Store

BASE = """
[model]
n_layer = 1
d_model = 16
n_head = 1
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
max_steps = 10
warmup_steps = 2
min_lr_ratio = 0.0
eval_every = 8
eval_batches = 1
eval_batch_size = 4
log_every = 1000
keep_last = 1
plot = false
"""

FRONTIER = """
[frontier]
title = "tiny frontier"
base = "base.toml"
seeds = [0]
extra_seeds = [1]
lr_grid = [2e-3, 4e-3, 8e-3]
max_lr_extensions = 1

[sizes.a]
model = {{ n_layer = 1, d_model = 16 }}
[sizes.b]
model = {{ n_layer = 1, d_model = 32, n_head = 2 }}
[sizes.c]
model = {{ n_layer = 2, d_model = 32, n_head = 2 }}

[[budget]]
flops = {b1}
sizes = ["a", "b", "c"]

[[budget]]
flops = {b2}
sizes = ["a", "b", "c"]
"""


@pytest.fixture(scope="module")
def data_with_test(tmp_path_factory):
    from nanogrow.data_prep.prepare import prepare

    out = tmp_path_factory.mktemp("frontier_data")
    meta = prepare("demo", out, tokenizer="bpe:512", max_tokens=60_000, val_tokens=4_096, test_tokens=4_096,
                   val_every=6, shard_tokens=30_000, workers=1, bpe_train_chars=200_000, overwrite=True,
                   log=lambda *_: None)
    assert meta["test"]["tokens"] == 4_096 and meta["val"]["tokens"] == 4_096
    return out


def write_frontier(tmp_path, data, b1=4e8, b2=1.2e9, **replace):
    (tmp_path / "base.toml").write_text(BASE.format(data=data))
    text = FRONTIER.format(b1=b1, b2=b2)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "fr.toml"
    path.write_text(text)
    return path


def test_chinchilla_fit_recovers_a_known_law():
    law = F.Fit(E=1.8, A=300.0, B=900.0, alpha=0.36, beta=0.30, k=7.0)
    ns = [3e4, 6e4, 1.2e5, 2.4e5, 4.8e5]
    ds = [3e5, 1e6, 3e6, 1e7]
    n = [x for x in ns for _ in ds]
    d = [y for _ in ns for y in ds]
    fit = F.fit_chinchilla(n, d, [law.loss(a, b) for a, b in zip(n, d)], k=7.0)
    assert fit.E == pytest.approx(1.8, rel=2e-2) and fit.alpha == pytest.approx(0.36, rel=3e-2)
    assert fit.beta == pytest.approx(0.30, rel=3e-2)
    assert fit.n_opt(1e13) == pytest.approx(law.n_opt(1e13), rel=0.1)
    # The compute-optimal N* minimises the loss along the IsoFLOP curve.
    c = 1e13
    n_star, _, l_star = law.frontier(c)
    for m in (0.7, 1.4):
        assert law.loss(n_star * m, c / (law.k * n_star * m)) > l_star


def test_isoflop_parabola_finds_an_interior_minimum_only():
    def point(n, loss):
        return F.Point("x", 1.0, 1e-3, n, 0, 0, [loss], 0)

    pts = [point(n, 2.0 + (math.log(n) - math.log(1e5)) ** 2) for n in (3e4, 1e5, 3e5)]
    pts.append(point(3e6, 9.0))  # far off on one side: the local parabola (best and neighbours) ignores it
    n, loss = F.isoflop_minimum(pts)
    assert n == pytest.approx(1e5, rel=1e-6) and loss == pytest.approx(2.0)
    rising = [point(n, math.log(n)) for n in (3e4, 1e5, 3e5)]
    assert F.isoflop_minimum(rising) is None  # the best is the smallest size: not bracketed


def test_lr_grid_extends_past_a_best_edge_then_settles(tmp_path, data_with_test):
    fr = F.load_frontier(write_frontier(tmp_path, data_with_test))
    store = Store(tmp_path / "fake.jsonl")
    budget = fr.budgets[0][0]

    def add(lr, loss):
        run = fr.run("a", budget, 0, lr)
        store.append({"arm": "a", "seed": 0, "lr": lr, "scale": run.scale, "config_hash": run.key,
                      "final_loss": loss})

    for lr, loss in [(2e-3, 5.0), (4e-3, 4.9), (8e-3, 4.8)]:
        add(lr, loss)
    grid, tuned = F.lr_grid_for(fr, store, "a", budget)
    assert grid == [2e-3, 4e-3, 8e-3, 1.6e-2] and tuned is None  # the best is the top edge: try 2x
    add(1.6e-2, 4.85)
    assert F.lr_grid_for(fr, store, "a", budget) == ([2e-3, 4e-3, 8e-3, 1.6e-2], 8e-3)


def test_a_budget_can_be_tuned_on_a_grid_of_its_own(tmp_path, data_with_test):
    """budget[i].lr_grid replaces frontier.lr_grid for that profile only (extensions start from it)."""
    fr = F.load_frontier(write_frontier(tmp_path, data_with_test, **{
        f"flops = {1.2e9}\nsizes": f"flops = {1.2e9}\nlr_grid = [5e-4, 1e-3, 2e-3]\nsizes"}))
    (b1, _), (b2, _) = fr.budgets
    assert fr.grid_at(b1) == [2e-3, 4e-3, 8e-3] and fr.grid_at(b2) == [5e-4, 1e-3, 2e-3]
    store = Store(tmp_path / "fake.jsonl")
    assert F.lr_grid_for(fr, store, "a", b2) == ([5e-4, 1e-3, 2e-3], None)
    assert "(1.2e+09: 0.0005, 0.001, 0.002)" in frontier_report._own_grids(fr)
    with pytest.raises(ConfigError, match=r"budget\[2\]\.lr_grid must be >= 3 increasing"):
        F.load_frontier(write_frontier(tmp_path, data_with_test, **{
            f"flops = {1.2e9}\nsizes": f"flops = {1.2e9}\nlr_grid = [1e-3]\nsizes"}))


def test_bad_frontier_files_are_refused_by_name(tmp_path, data_with_test):
    with pytest.raises(ConfigError, match=r"budget\[1\]\.sizes \['zz'\]"):
        F.load_frontier(write_frontier(tmp_path, data_with_test, **{'sizes = ["a", "b", "c"]\n\n[[budget]]':
                                                                    'sizes = ["a", "zz", "c"]\n\n[[budget]]'}))
    with pytest.raises(ConfigError, match="lr_grid must be >= 3 increasing"):
        F.load_frontier(write_frontier(tmp_path, data_with_test, **{"[2e-3, 4e-3, 8e-3]": "[4e-3, 2e-3, 8e-3]"}))
    with pytest.raises(ConfigError, match="trains only"):
        F.load_frontier(write_frontier(tmp_path, data_with_test, b1=1e6))


LAW = F.Fit(E=2.0, A=40.0, B=400.0, alpha=0.4, beta=0.35, k=7.0)


def fake_execute(fr):
    """``execute`` without training: the loss of a known law, worse away from lr 4e-3, test = val + 0.01."""
    def execute(study, run):
        budget = run.scale * fr.budgets[0][0]
        tokens = run.cfg.train.max_steps * run.cfg.train.micro_batch * run.cfg.data.seq_len
        loss = LAW.loss(fr.params(run.arm), tokens) + 0.02 * abs(math.log2(run.lr / 4e-3)) + 0.001 * run.seed
        return {"study": study.name, "arm": run.arm, "seed": run.seed, "lr": run.lr, "scale": run.scale,
                "config_hash": run.key, "final_loss": loss, "final_loss_se": 0.01, "final_test_loss": loss + 0.01,
                "flops": budget, "tokens": tokens, "wall_seconds": 1.0, "commit": "abc",
                "machine": {"cpu": "test", "cores": 2, "torch": "x"}}
    return execute


def test_a_frontier_plans_tunes_fits_and_reports(tmp_path, data_with_test, monkeypatch):
    from nanogrow.handbook import runner

    fr = F.load_frontier(write_frontier(tmp_path, data_with_test))
    monkeypatch.setattr(runner, "execute", fake_execute(fr))
    made = F.run_frontier(fr, log=lambda *_: None)
    store = Store(fr.store_path)
    assert made == len(store.records) == 2 * 3 * 3 + 2  # two profiles x three sizes x the grid, + an extra seed each
    assert F.plan_frontier(fr, store) == []
    summary = F.frontier_summary(fr, store, reps=20)
    assert all(p.lr == 4e-3 for p in summary["points"])  # the lr the fake prefers, inside the grid
    assert summary["points"][0].test[0] == pytest.approx(summary["points"][0].val + 0.01)  # reported on test
    best = summary["profiles"][fr.budgets[0][0]]["best"]
    assert len(best.test) == 2  # the best size has its extra seed
    md = frontier_markdown(fr, plots=False, reps=20)
    assert "| 4e+08 |" in md and "Fit (Chinchilla form" in md and "(best)" in md


def test_a_frontier_run_spends_its_budget_and_is_scored_on_val_and_test(tmp_path, data_with_test, monkeypatch):
    from nanogrow.handbook import runner

    monkeypatch.chdir(tmp_path)  # the run directory goes under tmp_path
    fr = F.load_frontier(write_frontier(tmp_path, data_with_test))
    budget = fr.budgets[0][0]
    run = fr.run("b", budget, 0, 4e-3)
    record = runner.execute(fr, run)
    assert record["final_test_loss"] > 0 and record["final_loss"] > 0
    assert record["final_test_loss"] != record["final_loss"]  # two different splits
    assert abs(record["flops"] - budget) <= fr.flops_per_step("b") / 2 + 1
    assert record["config_hash"] == run.key and record["arm"] == "b"


def test_frontier_compute_for_loss_inverts_the_frontier():
    for c in (1e11, 1e13, 1e15):
        assert LAW.compute_for_loss(LAW.frontier(c)[2]) == pytest.approx(c, rel=1e-6)
    assert LAW.compute_for_loss(LAW.E) == math.inf


def envelope_of(budgets_losses: list[tuple[float, float]], seeds=(0.0, 0.01, -0.01)) -> F.Envelope:
    profiles = {c: {"best": F.Point("s", c, 1e-3, 1000, 1.0, c, [loss + d for d in seeds], loss),
                    "points": [], "parabola": None, "complete": True} for c, loss in budgets_losses}
    return F.envelope(profiles)


def test_the_measured_frontier_interpolates_in_log_flops_never_rises_and_flags_extrapolation():
    env = envelope_of([(1e12, 5.0), (1e11, 6.0), (1e13, 5.1), (1e14, 4.0)])  # 1e13 measured worse than 1e12
    assert env.budgets == [1e11, 1e12, 1e13, 1e14]
    assert env.losses == [6.0, 5.0, 5.0, 4.0]  # lowered: more compute can always buy the smaller budget's model
    assert env.loss_at(10 ** 11.5) == pytest.approx(5.5)
    assert env.loss_at(10 ** 13.5) == pytest.approx(4.5)
    assert env.loss_at(1e10) == pytest.approx(7.0) and env.outside(1e10)  # the end segment's slope, flagged
    assert not env.outside(5e12)
    c, out = env.compute_for_loss(5.5)
    assert c == pytest.approx(10 ** 11.5) and not out
    assert env.compute_for_loss(5.0) == (1e12, False)  # a flat stretch answers its cheapest end
    c, out = env.compute_for_loss(3.5)
    assert c == pytest.approx(10 ** 14.5) and out
    c, out = env.compute_for_loss(6.5)
    assert c == pytest.approx(10 ** 10.5) and out
    for flops in (2e11, 3e12, 7e13):
        assert env.compute_for_loss(env.loss_at(flops))[0] == pytest.approx(flops) or env.loss_at(flops) == 5.0
    lo, hi = env.band_at(1e12)
    assert lo < 5.0 < hi and math.isnan(env.band_at(1e15)[0])  # no interval outside the budgets measured
    assert envelope_of([(1e12, 5.0)]) is None  # one budget is no frontier


STUDY = """
[study]
title = "against the frontier"
base = "base-study.toml"
seeds = [0, 1]
reference = "scratch"
lr_grid = [2e-3, 4e-3]
frontier = "fr.toml"
other_shapes = ["start alone"]

[arms.scratch]

[arms."start alone"]
model = { n_layer = 1, d_model = 16, n_head = 1 }

[arms."grown"]
model = { n_layer = 1 }
stage = [{ at_frac = 0.5, shape = { n_layer = 2 } }]
"""


def test_a_study_is_read_against_the_frontier_and_its_start_model_alone(tmp_path, data_with_test, monkeypatch):
    from nanogrow.handbook import report, runner
    from nanogrow.handbook.study import load_study

    fr = F.load_frontier(write_frontier(tmp_path, data_with_test))
    monkeypatch.setattr(runner, "execute", fake_execute(fr))
    F.run_frontier(fr, log=lambda *_: None)
    base = BASE.format(data=data_with_test).replace("n_layer = 1\nd_model = 16", "n_layer = 2\nd_model = 32")
    (tmp_path / "base-study.toml").write_text(base.replace("n_head = 1", "n_head = 2")
                                              .replace("max_steps = 10", "max_steps = 25"))
    (tmp_path / "study.toml").write_text(STUDY)
    study = load_study(tmp_path / "study.toml")
    assert study.frontier == (tmp_path / "fr.toml").resolve()

    env = F.frontier_summary(fr, reps=20)["envelope"]

    def execute(study_, run):  # the measured frontier at the run's FLOPs, the grown arm well below it
        flops = study.budget_flops * run.scale
        offset = {"scratch": 0.05, "start alone": 0.02, "grown": -0.3}[run.arm]
        loss = env.loss_at(flops) + offset + 0.001 * run.seed
        loss += 0.01 * (run.lr != 4e-3)
        return {"study": study_.name, "arm": run.arm, "seed": run.seed, "lr": run.lr, "scale": run.scale,
                "config_hash": run.key, "curve": [[flops, 0, 1.0, loss]], "growth_events": [], "final_loss": loss,
                "final_loss_se": 0.01, "final_test_loss": loss, "final_test_loss_se": 0.01, "flops": flops,
                "wall_seconds": 1.0, "commit": "abc", "machine": {"cpu": "test", "cores": 2, "torch": "x"}}

    monkeypatch.setattr(runner, "execute", execute)
    runner.run_study(study, log=lambda *_: None)
    md = report.study_markdown(study, plots=False)
    table = md[md.index("Against the scratch frontier"):]
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "beats the frontier" in rows["grown"] and "loses to the frontier" in rows["scratch"]
    assert "loses to the frontier" in rows["start alone"] and "extrapolated" not in rows["scratch"]
