from dataclasses import replace

import pytest
import torch

from nanogrow.grow import grow, make_plan
from nanogrow.grow.depth import lag_design_space, lag_order
from nanogrow.grow.testing import check_plan, logits, one_thread, tiny_config, trained_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield

LAYER_SUFFIXES = ("attn_norm.weight", "attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight",
                  "mlp_norm.weight", "mlp.w_gate.weight", "mlp.w_up.weight", "mlp.w_down.weight")


def layer_equal(new_model, i, old_model, j) -> bool:
    new, old = dict(new_model.named_parameters()), dict(old_model.named_parameters())
    return all(torch.equal(new[f"layers.{i}.{s}"], old[f"layers.{j}.{s}"]) for s in LAYER_SUFFIXES)


def layer_sources(plan) -> list:
    """Old layer each target layer copies (0-indexed), or 'new' for fresh layers, read off the plan."""
    out = []
    for i in range(plan.new_cfg.n_layer):
        src = plan.targets[f"layers.{i}.attn.wq.weight"].copies_whole
        out.append(int(src.split(".")[1]) if src else "new")
    return out


@pytest.mark.parametrize("L2", [4, 5, 6])
def test_stack_copies_layer_i_mod_L(L2):
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    plan = make_plan("stack", cfg, replace(cfg, n_layer=L2))
    check_plan(plan)
    new, _ = grow(model, opt, plan)
    for i in range(L2):
        assert layer_equal(new, i, model, i % 2)
    assert torch.equal(new.tok_emb.weight, model.tok_emb.weight)
    assert torch.equal(new.norm.weight, model.norm.weight)


def test_stack_honours_an_explicit_order_with_random_layers():
    cfg = tiny_config(n_layer=3)
    model, opt = trained_model(cfg)
    order = [2, 0, None, 0, -1]
    plan = make_plan("stack", cfg, replace(cfg, n_layer=5), order=order)
    check_plan(plan)
    new, _ = grow(model, opt, plan)
    assert layer_equal(new, 0, model, 2) and layer_equal(new, 1, model, 0) and layer_equal(new, 3, model, 0)
    for i in (2, 4):  # fresh random layers: equal to no old layer, norm gains 1, init_weights' std
        assert not any(layer_equal(new, i, model, j) for j in range(3))
        assert torch.equal(new.layers[str(i)].attn_norm.weight, torch.ones(32))
        assert new.layers[str(i)].attn.wq.weight.std().item() == pytest.approx(0.05, rel=0.15)
    assert not torch.equal(new.layers["2"].attn.wq.weight, new.layers["4"].attn.wq.weight)
    assert layer_sources(plan) == [2, 0, "new", 0, "new"]


def test_interleave_puts_each_layer_next_to_its_copy():
    cfg = tiny_config(n_layer=3)
    model, opt = trained_model(cfg)
    plan = make_plan("interleave", cfg, replace(cfg, n_layer=6))
    new, _ = grow(model, opt, plan)
    for i in range(6):
        assert layer_equal(new, i, model, i // 2)
    with pytest.raises(ValueError, match="integer factor"):
        make_plan("interleave", cfg, replace(cfg, n_layer=5))


# Karp et al. section 2.1, 6 -> 9 layers, written 1-indexed with primes for copies and r for random layers.
LAG_EXAMPLES = [
    (dict(start=1, block=1, init="copy"), "1 1' 2 2' 3 3' 4 5 6"),
    (dict(start=4, block=3, init="copy"), "1 2 3 4 5 6 4' 5' 6'"),
    (dict(start=2, block=1, init="random"), "1 2 r 3 r 4 r 5 6"),
    (dict(start=3, block=3, init="random"), "1 2 3 4 5 r r r 6"),
]


def _expected(text):
    return [None if t == "r" else int(t.rstrip("'")) - 1 for t in text.split()]


@pytest.mark.parametrize("opts,text", LAG_EXAMPLES)
def test_lag_examples_from_the_paper(opts, text):
    assert lag_order(6, 9, **opts) == _expected(text)
    cfg = tiny_config(n_layer=6, d_model=16, n_head=2, n_kv_head=1, d_ff=32)
    plan = make_plan("lag", cfg, replace(cfg, n_layer=9), **opts)
    check_plan(plan)
    want = ["new" if x is None else x for x in _expected(text)]
    assert layer_sources(plan) == want
    # The primed copies (second occurrences) and random layers are the "new" ones that fade in.
    fade = make_plan("lag", cfg, replace(cfg, n_layer=9), fade_steps=10, **opts)
    new_idx = [i for i, t in enumerate(text.split()) if t == "r" or t.endswith("'")]
    assert sorted(fade.masks) == sorted(f"layers.{i}.block_mask" for i in new_idx)


def test_lag_design_space_size_and_validity():
    space = lag_design_space(6, 9)
    assert len(space) == 4 * 2 * 2  # start in {1..4}, block in {1, 3}, init in {copy, random}
    assert {(c["start"], c["block"]) for c in space} == {(s, b) for s in range(1, 5) for b in (1, 3)}
    assert len(lag_design_space(12, 16)) == 9 * 3 * 2  # D=4: start 1..9, block 1, 2, 4
    assert len(lag_design_space(4, 8, inits=("copy",))) == 1 * 3
    cfg = tiny_config(n_layer=6, d_model=16, n_head=2, n_kv_head=1, d_ff=32)
    for cand in space:
        assert len(lag_order(6, 9, **cand)) == 9
        check_plan(make_plan("lag", cfg, replace(cfg, n_layer=9), **cand))


@pytest.mark.parametrize("bad,msg", [
    (dict(start=5, block=1), "start"), (dict(start=0, block=1), "start"), (dict(start=1, block=2), "divide"),
    (dict(start=1, block=1, init="zeros"), "init"),
])
def test_lag_rejects_points_outside_the_design_space(bad, msg):
    cfg = tiny_config(n_layer=6, d_model=16, n_head=2, n_kv_head=1, d_ff=32)
    with pytest.raises(ValueError, match=msg):
        make_plan("lag", cfg, replace(cfg, n_layer=9), **bad)
    with pytest.raises(ValueError, match="1 <= D <= L"):
        make_plan("lag", cfg, replace(cfg, n_layer=13))


@pytest.mark.parametrize("gqa", [True, False])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("where", [dict(), dict(positions=[0, 3]), dict(every=1, init="copy")])
def test_identity_blocks_preserve_logits(gqa, tied, where):
    cfg = tiny_config(gqa=gqa, tied=tied)
    model, opt = trained_model(cfg)
    plan = make_plan("identity", cfg, replace(cfg, n_layer=4), **where)
    check_plan(plan)
    new, _ = grow(model, opt, plan)
    torch.testing.assert_close(logits(new), logits(model), atol=1e-5, rtol=0)
    for i in range(4):  # the inserted blocks have zero output projections; the rest copies the old layers
        if layer_sources(plan)[i] == "new":
            assert not new.layers[str(i)].attn.wo.weight.any() and not new.layers[str(i)].mlp.w_down.weight.any()


def test_identity_block_gets_gradients():
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    new, new_opt = grow(model, opt, make_plan("identity", cfg, replace(cfg, n_layer=3)))
    x = torch.randint(0, 64, (2, 9))
    new(x[:, :-1], x[:, 1:].contiguous()).backward()
    assert new.layers["2"].attn.wo.weight.grad.abs().sum() > 0
    assert new.layers["2"].mlp.w_down.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("op,opts", [
    ("stack", {}), ("interleave", {}), ("lag", dict(start=1, block=1, init="random")),
    ("stack", dict(order=[0, None, 1, None])),
])
def test_fade_in_makes_any_depth_growth_preserving(op, opts):
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    plan = make_plan(op, cfg, replace(cfg, n_layer=4), fade_steps=10, **opts)
    new, _ = grow(model, opt, plan)
    torch.testing.assert_close(logits(new), logits(model), atol=1e-5, rtol=0)
    # Without the fade the same growth changes the function: the test above can fail.
    plain, _ = grow(model, opt, make_plan(op, cfg, replace(cfg, n_layer=4), **opts))
    assert (logits(plain) - logits(model)).abs().max() > 1e-3
    # Halfway through the ramp the new blocks count half: out = h + 0.5 * branch(h).
    ramp = plan.mask_ramp(start_step=100)
    ramp.apply(new, 105)
    assert all(new.layers[k.split(".")[1]].block_mask.item() == 0.5 for k in plan.masks)
    assert ramp.apply(new, 110) is True
    assert all(b is None for n, b in new.named_buffers() if n.endswith("block_mask"))
    torch.testing.assert_close(logits(new), logits(plain), atol=1e-6, rtol=0)


def test_depth_ops_reject_width_changes():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="joint"):
        make_plan("stack", cfg, replace(cfg, n_layer=4, d_ff=96))
    with pytest.raises(ValueError, match="order"):
        make_plan("stack", cfg, replace(cfg, n_layer=4), order=[0, 1, 2, 0])
    with pytest.raises(ValueError, match="positions"):
        make_plan("identity", cfg, replace(cfg, n_layer=4), positions=[1])


@pytest.mark.parametrize("layout,L2", [("stack", 4), ("stack", 5), ("interleave", 6)])
def test_split_copies_layers_and_splits_output_projections(layout, L2):
    """What split preserves exactly: every non-output weight is a copy, the k copies of old layer j have output
    projections summing to j's, and Adam's first update direction (m / sqrt(v)) is that of the source."""
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    plan = make_plan("split", cfg, replace(cfg, n_layer=L2), layout=layout)
    check_plan(plan)
    new, new_opt = grow(model, opt, plan)
    src = [i % 2 for i in range(L2)] if layout == "stack" else [i // (L2 // 2) for i in range(L2)]
    assert layer_sources(plan) == src
    old_p, new_p = dict(model.named_parameters()), dict(new.named_parameters())
    for j in range(2):
        mine = [i for i in range(L2) if src[i] == j]
        for suffix in LAYER_SUFFIXES:
            if suffix in ("attn.wo.weight", "mlp.w_down.weight"):
                total = sum(new_p[f"layers.{i}.{suffix}"] for i in mine)
                torch.testing.assert_close(total, old_p[f"layers.{j}.{suffix}"], atol=1e-7, rtol=1e-6)
                for i in mine:
                    torch.testing.assert_close(new_p[f"layers.{i}.{suffix}"] * len(mine),
                                               old_p[f"layers.{j}.{suffix}"], atol=1e-7, rtol=1e-6)
                    m_new, v_new = (new_opt.state[new_p[f"layers.{i}.{suffix}"]][k] for k in ("exp_avg", "exp_avg_sq"))
                    m_old, v_old = (opt.state[old_p[f"layers.{j}.{suffix}"]][k] for k in ("exp_avg", "exp_avg_sq"))
                    torch.testing.assert_close(m_new / (v_new.sqrt() + 1e-30), m_old / (v_old.sqrt() + 1e-30),
                                               atol=1e-5, rtol=1e-5)
            else:
                for i in mine:
                    assert torch.equal(new_p[f"layers.{i}.{suffix}"], old_p[f"layers.{j}.{suffix}"])


def test_split_changes_the_function_less_than_stack():
    """Read as an ODE, split integrates the old residual stream with a finer step: closer to the old function
    than a plain copy (which adds each block k times), though not equal to it."""
    cfg = tiny_config()
    model, opt = trained_model(cfg)
    ref = logits(model)
    for layout in ("stack", "interleave"):
        plain_op = "stack" if layout == "stack" else "interleave"
        plain, _ = grow(model, opt, make_plan(plain_op, cfg, replace(cfg, n_layer=4)))
        split, _ = grow(model, opt, make_plan("split", cfg, replace(cfg, n_layer=4), layout=layout))
        d_split, d_plain = (logits(split) - ref).abs().max(), (logits(plain) - ref).abs().max()
        assert 0 < d_split < 0.7 * d_plain, (layout, float(d_split), float(d_plain))


def test_split_rejects_bad_layouts():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="layout must be"):
        make_plan("split", cfg, replace(cfg, n_layer=4), layout="middle")
    with pytest.raises(ValueError, match="integer factor"):
        make_plan("split", cfg, replace(cfg, n_layer=5), layout="interleave")
