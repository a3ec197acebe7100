from dataclasses import replace

import pytest
import torch

from nanogrow.grow import grow, make_plan
from nanogrow.grow.testing import check_plan, logits, one_thread, tiny_config, train_steps, trained_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def axis_change(axis: str, gqa: bool) -> dict:
    """New-shape overrides of tiny_config (d_model 32, heads 4 with kv 2 (GQA) or 4, head_dim 8, d_ff 64)."""
    kv = (lambda gqa_kv, mha_kv: gqa_kv if gqa else mha_kv)
    return {
        "d_ff": dict(d_ff=96),
        "heads": dict(n_head=8, n_kv_head=kv(2, 8), head_dim=8),  # GQA: new query heads inside the 2 groups
        "kv_groups": dict(n_head=6, n_kv_head=kv(3, 6), head_dim=8),  # GQA: a new kv group of 2 query heads
        "d_model": dict(d_model=64, n_head=8, n_kv_head=kv(4, 8)),  # head_dim stays 64/8 = 8
        "all": dict(d_model=64, n_head=8, n_kv_head=kv(4, 8), d_ff=128),
    }[axis]


OPS = {"zero": {}, "net2net": {}, "vt": {}, "msg": {"fade_steps": 10}}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
@pytest.mark.parametrize("axis", ["d_ff", "heads", "kv_groups", "d_model", "all"])
@pytest.mark.parametrize("op", list(OPS))
def test_widen_preserves_logits(op, axis, gqa, tied):
    cfg = tiny_config(gqa=gqa, tied=tied)
    model, opt = trained_model(cfg)
    new_cfg = replace(cfg, **axis_change(axis, gqa))
    plan = make_plan(op, cfg, new_cfg, seed=1, **OPS[op])
    check_plan(plan)
    new, new_opt = grow(model, opt, plan)
    assert [getattr(new.config, k) for k in ("d_model", "n_head", "n_kv_head", "d_ff")] == \
        [getattr(new_cfg.resolved(), k) for k in ("d_model", "n_head", "n_kv_head", "d_ff")]
    torch.testing.assert_close(logits(new), logits(model), atol=1e-5, rtol=0)
    # and the grown model trains
    losses = train_steps(new, new_opt, 2, seed=5, ramp=plan.mask_ramp(0))
    assert all(torch.isfinite(torch.tensor(losses)))


def test_net2net_noise_keeps_the_function_but_breaks_symmetry():
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    new_cfg = replace(cfg, d_ff=128, n_head=8, head_dim=8)
    plain, _ = grow(model, opt, make_plan("net2net", cfg, new_cfg))
    noisy, _ = grow(model, opt, make_plan("net2net", cfg, new_cfg, noise=0.01))
    torch.testing.assert_close(logits(noisy), logits(model), atol=1e-5, rtol=0)
    wd_plain, wd_noisy = plain.layers["0"].mlp.w_down.weight, noisy.layers["0"].mlp.w_down.weight
    torch.testing.assert_close(wd_plain[:, :64] * 2, model.layers["0"].mlp.w_down.weight)  # split in halves
    torch.testing.assert_close(wd_plain[:, 64:], wd_plain[:, :64])
    assert (wd_noisy[:, 64:] - wd_noisy[:, :64]).abs().max() > 1e-3
    torch.testing.assert_close(wd_noisy[:, 64:] + wd_noisy[:, :64], model.layers["0"].mlp.w_down.weight)


def test_vt_twins_share_fan_in_cancel_fan_out_and_rescale_old_weights():
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    C, k = 64, 64
    new, _ = grow(model, opt, make_plan("vt", cfg, replace(cfg, d_ff=C + k), seed=3))
    old_mlp, mlp = model.layers["1"].mlp, new.layers["1"].mlp
    a, b = slice(C, C + k // 2), slice(C + k // 2, C + k)
    assert torch.equal(mlp.w_gate.weight[a], mlp.w_gate.weight[b])
    assert torch.equal(mlp.w_up.weight[a], mlp.w_up.weight[b])
    assert torch.equal(mlp.w_down.weight[:, a], -mlp.w_down.weight[:, b])
    # Variances 1/C^2 (fan-in) and 1/(C+k)^2 (fan-out): std 1/64 and 1/128.
    assert mlp.w_gate.weight[a].std().item() == pytest.approx(1 / C, rel=0.1)
    assert mlp.w_down.weight[:, a].std().item() == pytest.approx(1 / (C + k), rel=0.1)
    # Old fan-out rescaled by C/(C+k), compensated on w_up (SwiGLU is linear in up).
    r = C / (C + k)
    torch.testing.assert_close(mlp.w_down.weight[:, :C], old_mlp.w_down.weight * r)
    torch.testing.assert_close(mlp.w_up.weight[:C], old_mlp.w_up.weight / r)
    assert torch.equal(mlp.w_gate.weight[:C], old_mlp.w_gate.weight)


@pytest.mark.parametrize("op", ["zero", "vt", "msg"])
def test_new_residual_channels_are_exactly_zero_at_growth(op):
    cfg = tiny_config(tied=True)
    model, opt = trained_model(cfg)
    plan = make_plan(op, cfg, replace(cfg, d_model=48, n_head=6, n_kv_head=3), **OPS[op])
    new, _ = grow(model, opt, plan)
    seen = []
    hooks = [blk.register_forward_hook(lambda m, i, o: seen.append(o)) for blk in new.layers.values()]
    logits(new)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 and all(not o[..., 32:].any() for o in seen)
    assert new.config.norm_eps == pytest.approx(cfg.norm_eps * 32 / 48)
    torch.testing.assert_close(new.norm.weight[:32], model.norm.weight * (32 / 48) ** 0.5)


def test_without_eps_rescaling_widening_d_model_is_not_exact():
    # The 1e-5 tolerance of test_widen_preserves_logits is meaningful: keeping norm_eps breaks it.
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    new, _ = grow(model, opt, make_plan("zero", cfg, replace(cfg, d_model=64, n_head=8, n_kv_head=4),
                                        scale_eps=False))
    assert (logits(new) - logits(model)).abs().max() > 1e-5
    assert new.config.norm_eps == cfg.norm_eps


def test_derived_d_ff_grows_with_d_model():
    cfg = tiny_config(d_ff=0)
    model, opt = trained_model(cfg)
    plan = make_plan("zero", cfg, replace(cfg, d_model=64, n_head=8, n_kv_head=4))
    assert (plan.old_cfg.d_ff, plan.new_cfg.d_ff) == (96, 192)
    new, _ = grow(model, opt, plan)
    torch.testing.assert_close(logits(new), logits(model), atol=1e-5, rtol=0)


def test_msg_masks_ramp_in_then_disappear():
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    plan = make_plan("msg", cfg, replace(cfg, d_model=48, n_head=6, n_kv_head=2, d_ff=96), fade_steps=4)
    new, new_opt = grow(model, opt, plan)
    assert new.resid_mask is not None and new.layers["0"].mlp.unit_mask is not None
    assert new.layers["0"].attn.head_mask.tolist() == [1, 1, 0, 1, 1, 0]  # the new head of each kv group
    assert new.resid_mask[32:].sum() == 0 and new.resid_mask[:32].sum() == 32
    ramp = plan.mask_ramp(start_step=10)
    losses = train_steps(new, new_opt, 6, seed=3, ramp=ramp, start_step=10)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert new.resid_mask is None and new.layers["1"].attn.head_mask is None and new.layers["1"].mlp.unit_mask is None


@pytest.mark.parametrize("bad,msg", [
    (("net2net", dict(d_model=48, n_head=6, n_kv_head=3)), "integer factor"),
    (("vt", dict(d_ff=65)), "even"),
    (("vt", dict(n_head=6, head_dim=8)), "even"),  # one new query head per kv group cannot pair
    (("zero", dict(d_model=64)), "head_dim"),  # d_model/n_head would change head_dim (RoPE)
    (("zero", dict(n_layer=3)), "joint"),
    (("msg", dict(d_ff=96), dict(fade_steps=0)), "fade_steps"),
])
def test_width_ops_reject_what_they_cannot_do(bad, msg):
    op, change, *opts = bad
    cfg = tiny_config()
    with pytest.raises(ValueError, match=msg):
        make_plan(op, cfg, replace(cfg, **change), **(opts[0] if opts else {}))


JOINTS = [
    dict(depth_op="identity", width_op="zero"),
    dict(depth_op="stack", width_op="msg", depth_options={"fade_steps": 5}, width_options={"fade_steps": 5}),
    dict(depth_op="lag", width_op="vt", depth_options={"start": 1, "block": 2, "fade_steps": 5},
         order="depth-first"),
    dict(depth_op="interleave", width_op="net2net", depth_options={"fade_steps": 5}),
    dict(depth_op="identity", width_op="vt", depth_options={"positions": [0, 2]}, order="depth-first"),
]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
@pytest.mark.parametrize("opts", JOINTS, ids=lambda o: f"{o['depth_op']}+{o['width_op']}-{o.get('order', 'wf')}")
def test_joint_growth_preserves_logits(opts, gqa, tied):
    cfg = tiny_config(gqa=gqa, tied=tied)
    model, opt = trained_model(cfg)
    new_cfg = replace(cfg, n_layer=4, **axis_change("all", gqa))
    plan = make_plan("joint", cfg, new_cfg, seed=2, **opts)
    check_plan(plan)
    new, new_opt = grow(model, opt, plan)
    torch.testing.assert_close(logits(new), logits(model), atol=1e-5, rtol=0)
    assert new.config.n_layer == 4 and new.config.d_model == 64
    losses = train_steps(new, new_opt, 2, seed=4, ramp=plan.mask_ramp(0))
    assert all(torch.isfinite(torch.tensor(losses)))


def test_joint_rejects_mismatched_fade_lengths_and_unknown_sub_options():
    cfg = tiny_config()
    new_cfg = replace(cfg, n_layer=4, d_ff=96)
    with pytest.raises(ValueError, match="fade_steps"):
        make_plan("joint", cfg, new_cfg, depth_op="stack", width_op="msg", depth_options={"fade_steps": 3},
                  width_options={"fade_steps": 5})
    with pytest.raises(ValueError, match="'blok'.*lag.*start, block"):
        make_plan("joint", cfg, new_cfg, depth_op="lag", depth_options={"blok": 1})
    with pytest.raises(ValueError, match="unknown width_op 'wide'"):
        make_plan("joint", cfg, new_cfg, width_op="wide")


def test_a_width_method_is_one_record():
    """Every width operator is a WidthMethod record over the same axis steps: a new record (here zero-like, with
    fan-in drawn at twice the init std) makes a working, function-preserving operator without other edits."""
    from nanogrow.grow import width

    assert set(width.METHODS) == set(width.OPERATORS)
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    wide = replace(cfg, d_model=64, n_head=8, n_kv_head=4, d_ff=128)
    custom = width.WidthMethod("zero2x", fan_in=lambda c, std: ("normal", 2 * std, 0.0),
                               fan_out=lambda c, std: ("zeros", 0.0, 0.0), writer=lambda std: ("zeros", 0.0, 0.0))
    plan = width._width(custom, cfg, wide, 0, {})
    check_plan(plan)
    new, _ = grow(model, opt, plan)
    torch.testing.assert_close(logits(new), logits(model), atol=1e-5, rtol=0)
    ref = make_plan("zero", cfg, wide)
    w, w_ref = (p.targets["layers.0.mlp.w_up.weight"].materialize(lambda n: dict(model.named_parameters())[n])
                for p in (plan, ref))
    assert w[64:].std() > 1.5 * w_ref[64:].std()  # the new rows follow the record's draw
