"""The learned (LiGO-style) growth operator: exact reproduction of its plain initial operator, map fitting that
lowers the loss, moment mapping against an independent reference, records, bad input, and the Trainer hook."""

import json
from dataclasses import replace

import pytest
import torch

from nanogrow.config import ConfigError
from nanogrow.grow import compose, grow, make_plan, plan_from_dict
from nanogrow.grow.learned import LearnedPlan, fit, map_flops
from nanogrow.grow.testing import batch, check_plan, logits, one_thread, tiny_config, train_steps, trained_model
from nanogrow.train import Trainer

from helpers import run_steps, tiny_run_config, with_stages

WIDE = dict(d_model=64, n_head=8, n_kv_head=4, d_ff=96)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def fixed_batches(cfg, n=3, seed=5000):
    xs = [batch(cfg, seed + s, batch_size=4) for s in range(n)]
    return [(x[:, :-1].contiguous(), x[:, 1:].contiguous()) for x in xs]


def cycling(batches):
    state = {"i": 0}

    def next_batch():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        return b
    return next_batch


def params_of(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def states_equal(m1, o1, m2, o2):
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p1, p2), n
        s1, s2 = o1.state[p1], o2.state[p2]
        assert sorted(s1) == sorted(s2), n
        for k in s1:
            assert torch.equal(s1[k], s2[k]), (n, k)


CASES = [  # (changes, learned options, the plain plan it must reproduce)
    (dict(n_layer=4), {}, ("stack", {})),
    (dict(n_layer=4), dict(init="interleave"), ("interleave", {})),
    (dict(n_layer=3), dict(init="lag", init_options=dict(start=2, block=1)), ("lag", dict(start=2, block=1))),
    (dict(n_head=6, n_kv_head=2, head_dim=8, d_ff=96), {}, ("net2net", {})),
    (dict(n_layer=3, **WIDE), {}, ("joint", dict(depth_op="stack", width_op="net2net"))),
]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("changes,options,plain", CASES)
def test_initial_maps_reproduce_the_plain_operator_exactly(tied, changes, options, plain):
    cfg = tiny_config(tied=tied)
    model, opt = trained_model(cfg, ages=True)
    # Non-uniform ages and lr scales: grow once (map+age), train, so the moment mapping is really exercised.
    model, opt = grow(model, opt, make_plan("zero", cfg, replace(cfg, d_ff=80)), policy="map+age")
    train_steps(model, opt, 2, seed=1)
    cfg = model.config
    new = replace(cfg, **changes)
    lp = make_plan("learned", cfg, new, **options)
    ref = make_plan(plain[0], cfg, new, **plain[1])
    check_plan(lp)
    assert isinstance(lp, LearnedPlan) and not lp.fitted and lp.new_cfg == ref.new_cfg
    m1, o1 = grow(model, opt, lp, policy="map+age")
    m2, o2 = grow(model, opt, ref, policy="map+age")
    states_equal(m1, o1, m2, o2)  # weights, exp_avg, exp_avg_sq, ages, steps: bit for bit
    assert torch.equal(logits(m1), logits(m2))
    # Zero fitting steps is the plain operator too.
    zero = fit(make_plan("learned", cfg, new, steps=0, **options), params_of(model), cycling(fixed_batches(cfg)))
    assert zero.fitted and zero.fit_record["flops"] == 0
    assert all(torch.equal(zero.targets[n].materialize(params_of(model).__getitem__), p)
               for n, p in m2.named_parameters())


@pytest.mark.parametrize("changes", [dict(n_layer=4), dict(n_layer=3, **WIDE)])
def test_fitted_maps_lower_the_loss_below_the_plain_operator(changes):
    cfg = tiny_config()
    model, opt = trained_model(cfg, steps=20)
    batches = fixed_batches(cfg)
    lp = make_plan("learned", cfg, replace(cfg, **changes), steps=12, lr=1e-2)
    fitted = fit(lp, params_of(model), cycling(batches))
    rec = fitted.fit_record
    assert rec["steps"] == 12 and len(rec["losses"]) == 12 and rec["tokens"] == 12 * 4 * 16
    # FLOPs: grown-model training FLOPs on the fitting tokens + 3x the map products per step.
    assert rec["flops"] == pytest.approx(rec["tokens"] * lp.new_cfg.flops_per_token(16) + 3 * 12 * map_flops(lp))
    plain, _ = grow(model, opt, lp)
    learned, _ = grow(model, opt, fitted)
    with torch.no_grad():
        before = sum(plain(x, y).item() for x, y in batches)
        after = sum(learned(x, y).item() for x, y in batches)
    assert after < before - 1e-3, (before, after)
    # The fitted maps are what the plan applies: the grown weights differ from the plain operator's.
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), learned.parameters()))


def _kron(m, block):
    return m if block == 1 else torch.kron(m, torch.eye(block))


def test_moments_of_a_fitted_plan_match_an_independent_reference():
    """exp_avg like the weights, exp_avg_sq by squared coefficients, ages / lr scales as |coefficient|-weighted
    means, computed here with explicit Kronecker products from the maps, per target."""
    cfg = tiny_config()
    model, opt = trained_model(cfg, ages=True)
    model, opt = grow(model, opt, make_plan("zero", cfg, replace(cfg, d_ff=80)), policy="map+age")
    train_steps(model, opt, 2, seed=1)
    cfg = model.config
    fitted = fit(make_plan("learned", cfg, replace(cfg, n_layer=3, **WIDE), steps=3, lr=5e-2),
                 params_of(model), cycling(fixed_batches(cfg)))
    new_model, new_opt = grow(model, opt, fitted, policy="map+age")
    maps, hd = fitted.maps, cfg.head_dim
    old = {n: (p, opt.state[p]) for n, p in model.named_parameters()}
    L = cfg.n_layer

    def side_maps(j, suffix):
        g = maps.get
        if suffix.endswith("norm.weight"):
            return g("d_model.out"), None
        if suffix == "attn.wq.weight":
            return _kron(g(f"layers.{j}.heads.q_out"), hd), g("d_model.in")
        if suffix in ("attn.wk.weight", "attn.wv.weight"):
            return _kron(g(f"layers.{j}.heads.kv_out"), hd), g("d_model.in")
        if suffix == "attn.wo.weight":
            return g("d_model.out"), _kron(g(f"layers.{j}.heads.q_in"), hd)
        if suffix in ("mlp.w_gate.weight", "mlp.w_up.weight"):
            return g(f"layers.{j}.d_ff.out"), g("d_model.in")
        return g("d_model.out"), g(f"layers.{j}.d_ff.in")

    def lin(t, left, right, c, f=lambda m: m):
        t = f(left) @ t if left is not None else t
        t = t @ f(right).t() if right is not None else t
        return f(c) * t

    checked = 0
    for name, p in new_model.named_parameters():
        if not name.startswith("layers."):
            continue
        i, suffix = int(name.split(".")[1]), name.split(".", 2)[2]
        coefs = maps[f"depth.{suffix}"][i]
        want = {k: 0 for k in ("exp_avg", "exp_avg_sq", "num_age", "num_lr", "den")}
        for j in range(L):
            w, st = old[f"layers.{j}.{suffix}"]
            left, right = side_maps(j, suffix)
            c = coefs[j]
            if float(c) == 0.0:
                continue
            want["exp_avg"] = want["exp_avg"] + lin(st["exp_avg"], left, right, c)
            want["exp_avg_sq"] = want["exp_avg_sq"] + lin(st["exp_avg_sq"], left, right, c, lambda m: m * m)
            age = st.get("age", torch.full_like(w, float(st["step"])))
            want["num_age"] = want["num_age"] + lin(age, left, right, c, torch.abs)
            want["num_lr"] = want["num_lr"] + lin(st.get("lr_scale", torch.ones_like(w)), left, right, c, torch.abs)
            want["den"] = want["den"] + lin(torch.ones_like(w), left, right, c, torch.abs)
        got = new_opt.state[p]
        torch.testing.assert_close(got["exp_avg"], want["exp_avg"], atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(got["exp_avg_sq"], want["exp_avg_sq"], atol=1e-10, rtol=1e-5)
        torch.testing.assert_close(got.get("age", torch.full_like(p, float(got["step"]))),
                                   want["num_age"] / want["den"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got.get("lr_scale", torch.ones_like(p)), want["num_lr"] / want["den"],
                                   atol=1e-6, rtol=1e-5)
        assert bool((got["exp_avg_sq"] >= 0).all())
        checked += 1
    assert checked == 3 * 9
    # The fitted depth coefficients mix layers (a real test of the weighted means), and ages really vary.
    assert any(int((maps[k] != 0).sum()) > maps[k].shape[0] for k in maps if k.startswith("depth."))
    assert any("age" in new_opt.state[p] for p in new_model.parameters())


def test_a_fitted_plan_record_rebuilds_identical_weights():
    cfg = tiny_config()
    model, _ = trained_model(cfg)
    old = params_of(model)
    fitted = fit(make_plan("learned", cfg, replace(cfg, n_layer=3, d_ff=96), steps=2, lr=1e-2), old,
                 cycling(fixed_batches(cfg)))
    d = json.loads(json.dumps(fitted.to_dict()))
    assert d["op"] == "learned" and d["fit"]["steps"] == 2 and "maps" in d
    again = plan_from_dict(d)
    assert again.fitted
    for n, pp in fitted.targets.items():
        assert torch.equal(pp.materialize(old.__getitem__), again.targets[n].materialize(old.__getitem__)), n
    assert "maps fitted: 2 steps" in fitted.describe()


@pytest.mark.parametrize("options,match", [
    (dict(steps=-1), "steps"), (dict(lr=0.0), "lr"), (dict(init="identity"), "init"),
    (dict(init="lag", init_options=dict(init="random")), "copy-only"), (dict(width_init="zero"), "width_init"),
    (dict(init_options=dict(bogus=1)), "bogus"), (dict(init_options=dict(fade_steps=3)), "fade_steps"),
])
def test_bad_options_are_rejected_before_any_tensor(options, match):
    cfg = tiny_config()
    with pytest.raises(ValueError, match=match):
        make_plan("learned", cfg, replace(cfg, n_layer=3), **options)


def test_learned_plans_do_not_compose_and_fit_only_once():
    cfg = tiny_config()
    lp = make_plan("learned", cfg, replace(cfg, n_layer=3, d_ff=96))
    with pytest.raises(ValueError, match="does not compose"):
        compose(lp, make_plan("stack", lp.new_cfg, replace(lp.new_cfg, n_layer=4)))
    with pytest.raises(ValueError, match="does not compose"):
        compose(make_plan("stack", cfg, replace(cfg, n_layer=4)), make_plan("learned", replace(cfg, n_layer=4),
                                                                            replace(cfg, n_layer=4, d_ff=96)))
    model, _ = trained_model(cfg)
    fitted = fit(replace(lp, options={**lp.options, "steps": 1}), params_of(model), cycling(fixed_batches(cfg)))
    with pytest.raises(ValueError, match="already fitted"):
        fit(fitted, params_of(model), cycling(fixed_batches(cfg)))


def test_config_rejects_bad_learned_options(demo_data, tmp_path):
    cfg = tiny_run_config(demo_data, tmp_path)
    with pytest.raises(ConfigError, match="steps"):
        with_stages(cfg, [{"shape": {"n_layer": 3}, "op": "learned", "options": {"steps": -2}, "at_step": 2}])


def test_trainer_runs_a_learned_stage_and_counts_its_tokens_and_flops(demo_data, tmp_path):
    cfg = with_stages(tiny_run_config(demo_data, tmp_path, max_steps=6),
                      [{"shape": {"n_layer": 3, "d_ff": 192}, "op": "learned", "options": {"steps": 3, "lr": 0.01},
                        "at_step": 3}], eval_at_growth=False)
    tr = Trainer(cfg, log=lambda *a, **k: None)
    run_steps(tr, 3)
    tokens, flops = tr.meter.total_tokens, tr.meter.total_flops
    pos = tr.loader.state_dict()
    tr.growth.grow_next_stage()
    event = tr.history[-1]
    rec = event["plan"]["fit"]
    assert event["plan"]["op"] == "learned" and rec["steps"] == 3
    assert tr.model_config.n_layer == 3 and tr.model_config.d_ff == 192
    # The fitting batches came from the training stream: counted as seen, and their FLOPs spent.
    assert tr.meter.total_tokens == tokens + rec["tokens"] == tokens + 3 * 4 * 64
    assert tr.meter.total_flops == pytest.approx(flops + rec["flops"])
    assert tr.meter.flops_by["fit"] == pytest.approx(rec["flops"])  # charged, in its own category
    assert tr.loader.state_dict() != pos
    losses = run_steps(tr, 3)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_lag_can_pick_among_learned_and_plain_candidates(demo_data, tmp_path):
    lag = {"candidates": [{"op": "stack"}, {"op": "learned", "options": {"steps": 2, "lr": 0.01}}], "steps": 1}
    cfg = with_stages(tiny_run_config(demo_data, tmp_path, max_steps=4),
                      [{"shape": {"n_layer": 4}, "lag": lag, "at_step": 2}], eval_at_growth=False)
    tr = Trainer(cfg, log=lambda *a, **k: None)
    run_steps(tr, 2)
    tr.growth.grow_next_stage()
    event = tr.history[-1]
    assert len(event["lag"]["candidates"]) == 2 and tr.model_config.n_layer == 4
    # A winning learned candidate's fit is the run's "fit"; a losing one's is part of what the selection charged.
    spent, scored = event["lag"]["flops_per_candidate"], event["lag"]["score_flops_per_candidate"]
    loser = 1 - event["lag"]["winner"]
    assert tr.meter.flops_by["selection"] == pytest.approx(spent[loser] + sum(scored))
    if event["plan"]["op"] == "learned":
        assert event["plan"]["fit"]["steps"] == 2
        assert tr.meter.flops_by["fit"] == pytest.approx(event["plan"]["fit"]["flops"]) > 0
    else:
        assert tr.meter.flops_by["fit"] == 0.0 and spent[1] > spent[0]  # the learned candidate's fit: in spent
    run_steps(tr, 2)


@pytest.mark.slow
def test_fsdp_and_ddp_at_2_processes_fit_the_same_maps_and_weights_as_one_process():
    """Every rank fits on its rows with averaged map gradients: identical maps on all ranks, equal to one process
    fitting on the whole batches (1e-4, the fit moves them > 1e-2), then the sharded growth matches grow()."""
    from helpers import run_worker

    out = run_worker(2, "learned", "fsdp,ddp").stdout
    assert out.count("OK learned") == 2


@pytest.mark.slow
def test_trainer_fits_learned_maps_under_fsdp_at_2_processes_like_one_process(demo_data, tmp_path):
    """The Trainer hook end to end: a 2-process FSDP run (each rank fits on its half of the global batch, map
    gradients averaged) grows like a 1-process run on the whole batch; same tokens and FLOPs counted."""
    import sys

    from test_parallel_train import CONFIG, TORCHRUN, run, val_losses

    stage = ('op = "joint"\noptions = {{ depth_op = "stack", width_op = "zero" }}',
             'op = "learned"\noptions = {{ steps = 3, lr = 0.02 }}')
    assert stage[0] in CONFIG
    config = CONFIG.replace(*stage)
    for name, mb, parallel in (("one", 4, "none"), ("two", 2, "fsdp")):
        (tmp_path / f"{name}.toml").write_text(config.format(data=demo_data, out=tmp_path / name, mb=mb,
                                                             parallel=parallel))
    run([sys.executable, "-m", "nanogrow.cli", "train", "--config", str(tmp_path / "one.toml")])
    out = run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "nanogrow.cli", "train", "--config",
               str(tmp_path / "two.toml")])
    assert "learned growth: fitted maps 3 steps" in out
    a, meta_one = val_losses(tmp_path / "one")
    b, meta_two = val_losses(tmp_path / "two")
    assert meta_two["world_size"] == 2 and meta_two["model_config"]["d_ff"] == 256
    fits = [[h["plan"]["fit"] for h in m["history"] if h["event"] == "grow"][0] for m in (meta_one, meta_two)]
    assert fits[0]["tokens"] == 2 * fits[1]["tokens"]  # per-rank record; the meter counts both ranks
    assert meta_one["meter"]["total_tokens"] == meta_two["meter"]["total_tokens"]
    # Model FLOPs are split across ranks; the map products are computed (and counted) on every rank.
    map_products = 2 * fits[1]["flops"] - fits[0]["flops"]
    assert map_products > 0
    assert meta_two["meter"]["total_flops"] - meta_one["meter"]["total_flops"] == pytest.approx(map_products)
    assert max(abs(x - y) for x, y in zip(fits[0]["losses"], fits[1]["losses"])) < 1e-4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)


def test_offline_growth_refuses_to_skip_fitting_and_a_learned_run_resumes(demo_data, tmp_path):
    from nanogrow.train import grow_checkpoint

    cfg = with_stages(tiny_run_config(demo_data, tmp_path / "run", max_steps=6),
                      [{"shape": {"n_layer": 3}, "op": "learned", "options": {"steps": 2, "lr": 0.01},
                        "at_step": 2}], eval_at_growth=False)
    tr = Trainer(cfg, log=lambda *a, **k: None)
    run_steps(tr, 2)
    path = tr.save()
    with pytest.raises(ValueError, match="offline growth has no data"):
        grow_checkpoint(path, {"n_layer": 3}, "learned", tmp_path / "big", options={"steps": 2})
    tr.growth.grow_next_stage()  # writes a checkpoint of the grown (fitted) model
    want = run_steps(tr, 2)
    resumed = Trainer(cfg, resume="auto", log=lambda *a, **k: None)
    assert resumed.model_config.n_layer == 3 and resumed.stage_index == 1
    assert run_steps(resumed, 2) == want
