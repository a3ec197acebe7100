"""The plan machinery, tested once for all operators: shapes, coverage, determinism, one-parameter-at-a-time
application, composition, JSON form, mask ramps, and bad input rejected before anything changes."""

import json
from dataclasses import replace

import pytest
import torch

from nanogrow.grow import OPERATORS, MaskRamp, compose, grow, make_plan, operator_options, plan_from_dict
from nanogrow.grow.plan import KINDS
from nanogrow.grow.schema import param_shapes
from nanogrow.grow.testing import check_plan, one_thread, tiny_config, train_steps, trained_model
from nanogrow.model import Transformer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def some_plans(cfg):
    """One plan per operator (several with fresh pieces, pairs, masks, additive noise)."""
    wide = dict(d_model=64, n_head=8, n_kv_head=4, d_ff=128)
    return {
        "stack": make_plan("stack", cfg, replace(cfg, n_layer=4), order=[0, None, 1, 0], fade_steps=3),
        "interleave": make_plan("interleave", cfg, replace(cfg, n_layer=4)),
        "lag": make_plan("lag", cfg, replace(cfg, n_layer=3), start=2, block=1, init="random"),
        "identity": make_plan("identity", cfg, replace(cfg, n_layer=3), positions=[1], init="copy"),
        "split": make_plan("split", cfg, replace(cfg, n_layer=5), fade_steps=2),
        "zero": make_plan("zero", cfg, replace(cfg, **wide), state="mean-of-source"),
        "net2net": make_plan("net2net", cfg, replace(cfg, **wide), noise=0.01),
        "vt": make_plan("vt", cfg, replace(cfg, **wide)),
        "msg": make_plan("msg", cfg, replace(cfg, **wide), fade_steps=3),
        "joint": make_plan("joint", cfg, replace(cfg, n_layer=3, **wide), depth_op="lag", width_op="vt",
                           depth_options=dict(init="random")),
        "learned": make_plan("learned", cfg, replace(cfg, n_layer=3, **wide)),
    }


def old_state(model, opt):
    """name -> kind -> tensor of the old model (ages vary per element once a map+age growth happened)."""
    from nanogrow.grow.optim import _state_reader

    readers = {k: _state_reader(model, opt, k) for k in ("exp_avg", "exp_avg_sq", "age", "lr_scale")}
    params = dict(model.named_parameters())
    return {k: (lambda n, k=k: params[n].detach()) if k == "param" else readers[k]
            for k in ("param", "exp_avg", "exp_avg_sq", "age", "lr_scale")}


@pytest.mark.parametrize("tied", [False, True])
def test_param_shapes_match_the_model(tied):
    with torch.device("meta"):
        model = Transformer(tiny_config(tied=tied))
    assert param_shapes(model.config) == {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_every_operator_covers_every_element_exactly_once():
    cfg = tiny_config()
    plans = some_plans(cfg)
    assert set(plans) == set(OPERATORS)
    for plan in plans.values():
        check_plan(plan)


def test_materialize_is_deterministic_order_independent_and_reads_only_its_sources():
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    params = dict(model.named_parameters())
    a = make_plan("joint", cfg, replace(cfg, n_layer=3, d_model=64, n_head=8, n_kv_head=4), seed=7,
                  depth_op="identity", width_op="vt")
    b = make_plan("joint", cfg, replace(cfg, n_layer=3, d_model=64, n_head=8, n_kv_head=4), seed=7,
                  depth_op="identity", width_op="vt")
    other = make_plan("joint", cfg, replace(cfg, n_layer=3, d_model=64, n_head=8, n_kv_head=4), seed=8,
                      depth_op="identity", width_op="vt")

    def strict_reader(pp):
        def read(name):
            assert name in pp.sources, f"{pp.name} read {name} which it does not declare"
            return params[name].detach()
        return read

    forward = {n: pp.materialize(strict_reader(pp)) for n, pp in a.targets.items()}
    backward = {n: b.targets[n].materialize(strict_reader(b.targets[n])) for n in reversed(list(b.targets))}
    assert all(torch.equal(forward[n], backward[n]) for n in forward)
    fresh = [n for n, pp in a.targets.items() if any(p.is_fresh and p.source.init == "normal" for p in pp.pieces)]
    assert fresh and all(not torch.equal(forward[n], other.targets[n].materialize(strict_reader(other.targets[n])))
                         for n in fresh)


@pytest.mark.parametrize("first,second", [
    (("net2net", dict(d_ff=96, n_head=8, head_dim=8), dict(noise=0.02)), ("stack", dict(n_layer=3), {})),
    (("zero", dict(d_ff=96), dict(state="mean-of-source")),
     ("stack", dict(n_layer=4), dict(order=[1, None, 0, 1], state="mean-of-source"))),
    (("msg", dict(d_model=48, n_head=6, n_kv_head=3, d_ff=96), dict(fade_steps=5)),
     ("lag", dict(n_layer=3), dict(start=2, block=1, fade_steps=5))),
    (("stack", dict(n_layer=3), dict(fade_steps=5)), ("vt", dict(d_model=48, n_head=6, n_kv_head=3), {})),
    (("vt", dict(d_ff=96), {}), ("net2net", dict(d_ff=160, d_model=64, n_head=8, n_kv_head=4), {})),
])
def test_compose_equals_applying_the_plans_in_sequence(first, second):
    cfg = tiny_config()
    # Non-trivial ages: grow once with map+age, train, then grow again.
    model, opt = trained_model(cfg)
    model, opt = grow(model, opt, make_plan("zero", cfg, replace(cfg, d_ff=80)), policy="map+age")
    train_steps(model, opt, 2, seed=1)
    cfg = model.config
    (op_a, ch_a, kw_a), (op_b, ch_b, kw_b) = first, second
    a = make_plan(op_a, cfg, replace(cfg, **ch_a), seed=1, **kw_a)
    b = make_plan(op_b, a.new_cfg, replace(a.new_cfg, **ch_b), seed=2, **kw_b)
    c = compose(a, b)
    check_plan(c)
    old = old_state(model, opt)
    for kind in ("param", "exp_avg", "exp_avg_sq", "age", "lr_scale"):
        mid = {n: pp.materialize(old[kind], kind) for n, pp in a.targets.items()}
        for n, pp in b.targets.items():
            seq = pp.materialize(mid.__getitem__, kind)
            one = c.targets[n].materialize(old[kind], kind)
            torch.testing.assert_close(one, seq, atol=1e-7, rtol=1e-6, msg=f"{kind} of {n}")
    # Fresh in the composition = fresh in b, or gathered by b from what was fresh in a.
    mid_fresh = {n: pp.materialize(None, "fresh") for n, pp in a.targets.items()}
    for n, pp in b.targets.items():
        want = pp.materialize(None, "fresh") + pp.materialize(mid_fresh.__getitem__, "age")  # age: plain gather
        assert torch.equal(c.targets[n].materialize(None, "fresh"), want), n
    # Masks: a's fading units follow their layers through b; b's own masks are added.
    want = dict(b.masks)
    for name, m in a.masks.items():
        for i, src in enumerate(b.targets[f"layers.{j}.attn_norm.weight"].primary_source
                                for j in range(b.new_cfg.n_layer)):
            if name == "resid_mask":
                want[name] = m
            elif src is not None and name.startswith(src.rsplit(".", 2)[0] + "."):
                want[name.replace(src.split(".")[1], str(i), 1)] = m
    assert sorted(c.masks) == sorted(want)
    for k in want:
        assert torch.equal(c.masks[k], want[k] | b.masks.get(k, torch.zeros_like(want[k]))), k


def test_plan_json_round_trip_rebuilds_identical_tensors():
    cfg = tiny_config()
    model, _ = trained_model(cfg)
    params = dict(model.named_parameters())
    plans = some_plans(cfg)
    plans["compose"] = compose(plans["vt"], make_plan("stack", plans["vt"].new_cfg,
                                                      replace(plans["vt"].new_cfg, n_layer=4)))
    for name, plan in plans.items():
        d = json.loads(json.dumps(plan.to_dict()))
        assert d["op"] == name and d["old"]["d_model"] == 32
        again = plan_from_dict(d)
        assert again.new_cfg == plan.new_cfg and sorted(again.masks) == sorted(plan.masks)
        for n, pp in plan.targets.items():
            assert torch.equal(pp.materialize(lambda s: params[s].detach()),
                               again.targets[n].materialize(lambda s: params[s].detach())), (name, n)


def test_describe_summarises_the_plan():
    cfg = tiny_config()
    text = some_plans(cfg)["joint"].describe()
    assert "joint(" in text and "n_layer: 2 -> 3" in text and "d_model: 32 -> 64" in text
    assert "layers <- old:" in text and "fresh elements" in text
    assert "masks:" in some_plans(cfg)["msg"].describe()


def test_mask_ramp_is_linear_json_able_and_removes_masks_at_the_end():
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    plan = make_plan("msg", cfg, replace(cfg, d_ff=96), fade_steps=4)
    new, _ = grow(model, opt, plan)
    ramp = MaskRamp.from_dict(json.loads(json.dumps(plan.mask_ramp(start_step=20).to_dict())))
    assert [ramp.value(s) for s in (19, 20, 21, 22, 24, 30)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    assert ramp.apply(new, 22) is False
    m = new.layers["1"].mlp.unit_mask
    assert torch.equal(m[:64], torch.ones(64)) and torch.equal(m[64:], torch.full((32,), 0.5))
    assert ramp.apply(new, 24) is True and new.layers["1"].mlp.unit_mask is None
    assert "layers.1.mlp.unit_mask" not in new.state_dict()


# ------------------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError before anything changes
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op,change,opts,msg", [
    ("stack", dict(n_layer=1), {}, "shrink n_layer"),
    ("zero", dict(d_ff=32), {}, "shrink d_ff"),
    ("zero", dict(vocab_size=128), {}, "vocab_size cannot change"),
    ("zero", dict(tie_embeddings=True), {}, "tie_embeddings cannot change"),
    ("zero", dict(n_head=6, n_kv_head=4, head_dim=8), {}, "not divisible by new.n_kv_head"),
    ("zero", dict(n_head=8, n_kv_head=8, head_dim=8), {}, "query heads per kv group cannot shrink"),
    ("grow", dict(d_ff=96), {}, "unknown growth operator 'grow'; known operators: stack, interleave, lag"),
    ("lag", dict(n_layer=3), dict(strat=1), "unknown option 'strat' for growth operator 'lag'.*start, block, init"),
    ("net2net", dict(d_ff=96), dict(fade_steps=3), "unknown option 'fade_steps'.*'net2net'.*valid options: noise"),
    ("zero", dict(d_ff=96), dict(state="copy"), "state must be one of"),
])
def test_bad_input_raises_value_error(op, change, opts, msg):
    cfg = tiny_config()
    with pytest.raises(ValueError, match=msg):
        make_plan(op, cfg, replace(cfg, **change), **opts)


def test_operator_options_are_listed():
    assert operator_options("lag") == ["start", "block", "init", "fade_steps", "state"]
    assert "fade_steps" in operator_options("msg") and "noise" in operator_options("net2net")


def test_failed_growth_leaves_model_and_optimizer_untouched():
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    other = make_plan("zero", tiny_config(d_ff=96), tiny_config(d_ff=128))  # grows another shape
    with pytest.raises(ValueError, match="not the plan's old shape"):
        grow(model, opt, other)
    with pytest.raises(ValueError, match="unknown optimizer transfer policy 'keep'"):
        grow(model, opt, make_plan("zero", cfg, replace(cfg, d_ff=96)), policy="keep")
    msg_plan = make_plan("msg", cfg, replace(cfg, d_ff=96), fade_steps=5)
    grown, grown_opt = grow(model, opt, msg_plan)
    with pytest.raises(ValueError, match="active growth masks"):  # the fade-in is not over
        grow(grown, grown_opt, make_plan("zero", grown.config, replace(grown.config, d_ff=128)))
    with pytest.raises(ValueError, match="compose"):
        compose(make_plan("zero", cfg, replace(cfg, d_ff=96)), make_plan("zero", cfg, replace(cfg, d_ff=96)))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for p, st in opt.state.items():
        assert all(torch.equal(opt_before[id(p)][k], v) for k, v in st.items())
    assert all(p.shape == before[n].shape for n, p in model.named_parameters())


def test_kinds_are_documented():
    assert KINDS == ("param", "exp_avg", "exp_avg_sq", "age", "lr_scale", "fresh")
