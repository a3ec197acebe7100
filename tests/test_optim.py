"""nanogrow AdamW (ages, lr scales), optimizer-state transfer through a plan, and learning-rate policies."""

import json
import math
from dataclasses import replace

import pytest
import torch

from nanogrow.grow import AdamW, GrowthLR, grow, make_plan, stagewise_lr_scales
from nanogrow.grow.testing import one_thread, tiny_config, train_steps, trained_model
from nanogrow.model import build_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def two_group_run(opt_factory, steps=5):
    """A tiny model trained with two param groups (decay / no decay, different lr) by ``opt_factory``."""
    model = build_model(tiny_config(), seed=0)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() == 1]
    opt = opt_factory([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0,
                                                                "lr": 3e-3}])
    train_steps(model, opt, steps, seed=9)
    return model, opt


@pytest.mark.parametrize("ours", [
    dict(), dict(ages=True),
], ids=["scalar-path", "with-ages"])
@pytest.mark.parametrize("theirs", [dict(), dict(foreach=False)], ids=["torch-default", "torch-foreach-off"])
def test_adamw_is_identical_to_torch_adamw_without_growth(ours, theirs):
    a, opt_a = two_group_run(lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **theirs))
    b, opt_b = two_group_run(lambda g: AdamW(g, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **ours))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert sa["step"].item() == sb["step"].item() == 5
        if ours.get("ages"):
            assert torch.equal(sb["age"], torch.full_like(p, 5.0))


def test_adamw_state_is_tensors_only_and_survives_a_state_dict_round_trip():
    model, opt = trained_model(tiny_config(), ages=True)
    model.to(torch.bfloat16)  # ages must stay float32 even when torch casts state to the parameter dtype
    sd = opt.state_dict()
    for st in sd["state"].values():
        assert set(st) == {"step", "exp_avg", "exp_avg_sq", "age"}
        assert all(isinstance(v, torch.Tensor) for v in st.values())
        assert st["step"].dim() == 0 and st["step"].dtype == torch.float32
    for st in sd["state"].values():
        st["age"] = st["age"] + 300.0  # 303 is not representable in bf16
    fresh = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    fresh.load_state_dict(sd)
    for p in model.parameters():
        assert fresh.state[p]["age"].dtype == torch.float32 and bool((fresh.state[p]["age"] == 303.0).all())
        assert fresh.state[p]["exp_avg"].dtype == torch.bfloat16


def test_resumed_adamw_continues_identically():
    model, opt = trained_model(tiny_config(), ages=True)
    twin = build_model(tiny_config(), seed=1)
    twin.load_state_dict(model.state_dict())
    twin_opt = AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    twin_opt.load_state_dict(json_free_copy(opt.state_dict()))
    train_steps(model, opt, 3, seed=4)
    train_steps(twin, twin_opt, 3, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def json_free_copy(sd):
    return {"state": {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


# ------------------------------------------------------------------------------------------------------------
# Transfer through a plan
# ------------------------------------------------------------------------------------------------------------

def aged_model():
    """A model whose optimizer state has per-element ages that differ (one earlier growth with map+age)."""
    cfg = tiny_config()
    model, opt = trained_model(cfg, steps=4)
    model, opt = grow(model, opt, make_plan("zero", cfg, replace(cfg, d_ff=96)), policy="map+age")
    train_steps(model, opt, 2, seed=1)
    return model, opt


def st(opt, model, name):
    return opt.state[dict(model.named_parameters())[name]]


def test_map_age_copies_moments_and_ages_of_copied_layers():
    model, opt = aged_model()
    cfg = model.config
    new, new_opt = grow(model, opt, make_plan("stack", cfg, replace(cfg, n_layer=4)), policy="map+age")
    for i in range(4):
        for s in ("attn.wq.weight", "mlp.w_down.weight", "mlp_norm.weight"):
            old, mapped = st(opt, model, f"layers.{i % 2}.{s}"), st(new_opt, new, f"layers.{i}.{s}")
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(mapped[k], old[k])
            want_age = old.get("age", torch.full_like(old["exp_avg"], old["step"].item()))
            assert torch.equal(mapped.get("age", torch.full_like(want_age, 6.0)), want_age)
    w_down_age = st(new_opt, new, "layers.3.mlp.w_down.weight")["age"]
    assert w_down_age[:, :64].unique().tolist() == [6.0] and w_down_age[:, 64:].unique().tolist() == [2.0]
    assert "age" not in st(new_opt, new, "tok_emb.weight")  # uniform age == step: fast scalar path
    assert all(s["step"].item() == 6 for s in new_opt.state.values())


def test_split_units_carry_scaled_moments():
    model, opt = aged_model()
    cfg = model.config
    plan = make_plan("net2net", cfg, replace(cfg, d_ff=192))  # every unit split in two
    new, new_opt = grow(model, opt, plan, policy="map+age")
    old, mapped = st(opt, model, "layers.1.mlp.w_down.weight"), st(new_opt, new, "layers.1.mlp.w_down.weight")
    for half in (slice(0, 96), slice(96, 192)):
        torch.testing.assert_close(mapped["exp_avg"][:, half], old["exp_avg"] * 0.5, rtol=0, atol=0)
        torch.testing.assert_close(mapped["exp_avg_sq"][:, half], old["exp_avg_sq"] * 0.25, rtol=0, atol=0)
        assert torch.equal(mapped["age"][:, half], old["age"])
    up_old, up = st(opt, model, "layers.1.mlp.w_up.weight"), st(new_opt, new, "layers.1.mlp.w_up.weight")
    assert torch.equal(up["exp_avg"][96:], up_old["exp_avg"]) and torch.equal(up["age"][96:], up_old["age"])


@pytest.mark.parametrize("state", ["zero", "mean-of-source"])
def test_fresh_elements_follow_the_state_policy_and_start_at_age_zero(state):
    model, opt = aged_model()
    cfg = model.config
    new, new_opt = grow(model, opt, make_plan("zero", cfg, replace(cfg, d_ff=128), state=state), policy="map+age")
    for name, sl in (("layers.0.mlp.w_down.weight", (slice(None), slice(96, 128))),
                     ("layers.0.mlp.w_gate.weight", (slice(96, 128),))):
        old, mapped = st(opt, model, name), st(new_opt, new, name)
        assert not mapped["age"][sl].any()
        for k in ("exp_avg", "exp_avg_sq"):
            want = old[k].mean().item() if state == "mean-of-source" else 0.0
            assert torch.allclose(mapped[k][sl], torch.full_like(mapped[k][sl], want))


def test_map_policy_has_one_global_step_and_reset_starts_fresh():
    model, opt = aged_model()
    cfg = model.config
    plan = make_plan("zero", cfg, replace(cfg, d_ff=128))
    new, new_opt = grow(model, opt, plan, policy="map")
    assert all("age" not in s and s["step"].item() == 6 for s in new_opt.state.values())
    assert len(new_opt.state) == len(list(new.parameters()))
    new, new_opt = grow(model, opt, plan, policy="reset")
    assert len(new_opt.state) == 0
    assert new_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_param_groups_and_hyper_parameters_are_preserved():
    model, opt = two_group_run(lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.9, 0.95)))  # torch's optimizer
    cfg = model.config
    new, new_opt = grow(model, opt, make_plan("stack", cfg, replace(cfg, n_layer=3), order=[0, None, 1]))
    assert isinstance(new_opt, AdamW) and len(new_opt.param_groups) == 2
    g0, g1 = new_opt.param_groups
    assert (g0["weight_decay"], g0["lr"], g0["betas"]) == (0.1, 1e-2, (0.9, 0.95))
    assert (g1["weight_decay"], g1["lr"]) == (0.0, 3e-3)
    assert {id(p) for p in g1["params"]} == {id(p) for p in new.parameters() if p.dim() == 1}
    assert st(new_opt, new, "layers.2.attn.wq.weight")["step"].item() == 5


@pytest.mark.parametrize("policy", ["reset", "map", "map+age"])
@pytest.mark.parametrize("op,change,opts", [
    ("stack", dict(n_layer=4), {}), ("vt", dict(d_ff=96, d_model=48, n_head=6, n_kv_head=3), {}),
    ("msg", dict(d_ff=96), dict(fade_steps=3)),
])
def test_growth_then_training_keeps_the_loss_finite(policy, op, change, opts):
    model, opt = aged_model()
    cfg = model.config
    plan = make_plan(op, cfg, replace(cfg, **change), **opts)
    new, new_opt = grow(model, opt, plan, policy=policy)
    losses = train_steps(new, new_opt, 4, seed=2, ramp=plan.mask_ramp(0))
    assert all(math.isfinite(x) for x in losses)


def test_with_ages_a_fresh_elements_first_update_is_about_lr():
    """After a long run (step 5000) Adam's bias corrections are ~1: a fresh element with zero moments then moves
    by lr * 0.1 g / sqrt(0.001 g^2) ~ 3.2 lr on its first step. With its own age 0 it moves by ~lr."""
    cfg = tiny_config()
    model, opt = trained_model(cfg, steps=3)
    for s in opt.state.values():
        s["step"].fill_(5000.0)
    plan = make_plan("zero", cfg, replace(cfg, d_ff=96))
    moves = {}
    for policy in ("map", "map+age"):
        new, new_opt = grow(model, opt, plan, policy=policy)
        for g in new_opt.param_groups:
            g["weight_decay"] = 0.0
        before = new.layers["0"].mlp.w_down.weight[:, 64:].clone()
        train_steps(new, new_opt, 1, seed=7)
        moves[policy] = (new.layers["0"].mlp.w_down.weight[:, 64:] - before).abs().median().item() / 1e-2
    assert 0.9 < moves["map+age"] <= 1.0 + 1e-6
    assert moves["map"] > 2.5


# ------------------------------------------------------------------------------------------------------------
# Learning rate
# ------------------------------------------------------------------------------------------------------------

def schedule(step):  # warm-up 10 steps to 1.0, then linear decay to 0 at step 110
    return step / 10 if step < 10 else max(0.0, 1 - (step - 10) / 100)


def test_growth_lr_policies():
    cont = GrowthLR("continue")
    cont.on_growth(50)
    assert cont.lr(60, schedule) == schedule(60)
    rewarm = GrowthLR("rewarm", warmup_steps=10, start_fraction=0.1)
    rewarm.on_growth(50)
    assert rewarm.lr(49, schedule) == schedule(49)
    assert rewarm.lr(50, schedule) == pytest.approx(0.1 * schedule(50))
    assert rewarm.lr(55, schedule) == pytest.approx(0.55 * schedule(55))
    assert rewarm.lr(60, schedule) == schedule(60)
    rewind = GrowthLR("rewind", peak_step=10)
    rewind.on_growth(50)
    assert rewind.lr(50, schedule) == 1.0 and rewind.lr(70, schedule) == pytest.approx(schedule(30))
    rewind.on_growth(80)
    assert rewind.lr(80, schedule) == 1.0
    again = GrowthLR.from_state_dict(json.loads(json.dumps(rewind.state_dict())))
    assert again == rewind and again.lr(95, schedule) == rewind.lr(95, schedule)
    with pytest.raises(ValueError, match="kind"):
        GrowthLR("cosine")
    with pytest.raises(ValueError, match="warmup_steps"):
        GrowthLR("rewarm")


def test_stagewise_lr_adaptation_scales_new_sub_networks_by_their_norm_ratio():
    model, opt = aged_model()
    cfg = model.config
    plan = make_plan("vt", cfg, replace(cfg, d_ff=128))
    new, new_opt = grow(model, opt, plan, policy="map+age", lr_adapt="vt")
    w = new.layers["1"].mlp.w_down.weight
    want = (w[:, 96:].norm() / w[:, :96].norm()).item()
    s = st(new_opt, new, "layers.1.mlp.w_down.weight")["lr_scale"]
    assert torch.allclose(s[:, 96:], torch.full_like(s[:, 96:], want)) and bool((s[:, :96] == 1).all())
    assert want < 1  # fresh VT weights (std 1/(C+k)) are smaller than the trained ones
    assert "lr_scale" not in st(new_opt, new, "tok_emb.weight")
    assert stagewise_lr_scales(plan, new)["layers.1.mlp.w_down.weight"].allclose(s)
    # The optimizer applies it: a fresh element (age 0) moves by about lr * lr_scale on its first step.
    for g in new_opt.param_groups:
        g["weight_decay"] = 0.0
    before = w[:, 96:].clone()
    train_steps(new, new_opt, 1, seed=3)
    move = (w[:, 96:] - before).abs().median().item() / (1e-2 * want)
    assert 0.9 < move <= 1.0 + 1e-5
    # ...and a later growth carries it with the elements (here: copied layers).
    cfg2 = new.config
    newer, newer_opt = grow(new, new_opt, make_plan("stack", cfg2, replace(cfg2, n_layer=3)), policy="map+age")
    assert torch.equal(st(newer_opt, newer, "layers.2.mlp.w_down.weight")["lr_scale"],
                       st(new_opt, new, "layers.0.mlp.w_down.weight")["lr_scale"])
    with pytest.raises(ValueError, match="reset"):
        grow(model, opt, plan, policy="reset", lr_adapt="vt")


def test_per_element_path_matches_adam_closed_form_per_age():
    """Elements of one tensor with different ages and lr scales each take exactly the AdamW step of a fresh
    optimizer that has run ``age`` steps with lr * lr_scale (checked against float64 arithmetic)."""
    torch.manual_seed(0)
    p0 = torch.randn(4, 8)
    grads = [torch.randn(4, 8) * 1e-2 for _ in range(3)]
    ages = torch.tensor([0.0, 1.0, 7.0, 5000.0]).repeat_interleave(8).view(4, 8)
    scales = torch.tensor([1.0, 0.5, 2.0, 1.0]).repeat_interleave(8).view(4, 8)
    m0, v0 = torch.randn(4, 8) * 1e-3 * (ages > 0), torch.rand(4, 8) * 1e-5 * (ages > 0)
    p = torch.nn.Parameter(p0.clone())
    opt = AdamW([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt.state[p] = {"step": torch.tensor(9.0), "exp_avg": m0.clone(), "exp_avg_sq": v0.clone(),
                    "age": ages.clone(), "lr_scale": scales.clone()}
    ref, m, v, a = p0.double(), m0.double(), v0.double(), ages.double()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        a = a + 1
        lr = 1e-2 * scales.double()
        ref = ref * (1 - lr * 0.1)
        m = 0.9 * m + 0.1 * g.double()
        v = 0.999 * v + 0.001 * g.double() ** 2
        ref = ref - lr * (m / (1 - 0.9 ** a)) / ((v / (1 - 0.999 ** a)).sqrt() + 1e-8)
    torch.testing.assert_close(p.detach().double(), ref, rtol=0, atol=2e-7)
    assert torch.equal(opt.state[p]["age"], ages + 3) and opt.state[p]["step"].item() == 12


def test_changing_ages_in_place_is_noticed():
    # Uniformity of a tensor's ages is cached; an in-place edit (new version) must invalidate the cache.
    p = torch.nn.Parameter(torch.zeros(2, 4))
    opt = AdamW([p], lr=1e-2, weight_decay=0.0, ages=True)
    for _ in range(3):
        p.grad = torch.ones(2, 4)
        opt.step()
    opt.state[p]["age"][1] = 0.0  # row 1 is "new"
    opt.state[p]["exp_avg"][1] = 0.0
    opt.state[p]["exp_avg_sq"][1] = 0.0
    before = p.detach().clone()
    p.grad = torch.ones(2, 4)
    opt.step()
    move = (p.detach() - before).abs()
    torch.testing.assert_close(move[1], torch.full((4,), 1e-2), rtol=1e-5, atol=0)
    assert opt.state[p]["age"].tolist() == [[4.0] * 4, [1.0] * 4]


def test_new_elements_are_fresh_pieces_and_repeated_copies():
    from nanogrow.grow.lr import new_elements

    cfg = tiny_config()
    stacked = new_elements(make_plan("stack", cfg, replace(cfg, n_layer=4)))
    assert {n.split(".")[1] for n in stacked} == {"2", "3"}  # the first copy of each layer continues it
    assert all(bool(m.all()) for m in stacked.values())
    mixed = new_elements(make_plan("stack", cfg, replace(cfg, n_layer=4), order=[1, None, 0, 1]))
    assert {n.split(".")[1] for n in mixed} == {"1", "3"}
    widened = new_elements(make_plan("zero", cfg, replace(cfg, d_ff=96)))
    m = widened["layers.0.mlp.w_up.weight"]
    assert not m[:64].any() and bool(m[64:].all())  # the 32 new hidden units
    assert "layers.0.attn.wq.weight" not in widened


def test_new_lr_mult_and_weight_decay_hold_act_on_new_elements_only():
    from nanogrow.grow.optim import drop_wd_scales

    model, opt = aged_model()
    cfg = model.config
    plan = make_plan("stack", cfg, replace(cfg, n_layer=3))
    new, new_opt = grow(model, opt, plan, policy="map+age", new_lr_mult=3.0, new_wd_hold=True)
    assert bool((st(new_opt, new, "layers.2.attn.wq.weight")["lr_scale"] == 3).all())
    assert bool((st(new_opt, new, "layers.2.attn.wq.weight")["wd_scale"] == 0).all())
    for name in ("layers.0.attn.wq.weight", "layers.1.mlp.w_up.weight", "tok_emb.weight"):
        assert not {"lr_scale", "wd_scale"} & set(st(new_opt, new, name))
    # With zero gradients Adam's moments keep moving the weights; the decay is what the hold removes: compare a
    # held element's step with the same step under the ordinary decay.
    w = new.layers["2"].attn.wq.weight
    ref, ref_opt = grow(model, opt, plan, policy="map+age", new_lr_mult=3.0)
    w_ref = ref.layers["2"].attn.wq.weight
    before = w.detach().clone()
    for p in list(new.parameters()) + list(ref.parameters()):
        p.grad = torch.zeros_like(p)
    new_opt.step()
    ref_opt.step()
    lr, wd = new_opt.param_groups[0]["lr"], new_opt.param_groups[0]["weight_decay"]
    assert wd > 0
    torch.testing.assert_close(w_ref, w - before * (lr * 3.0 * wd), atol=1e-7, rtol=1e-6)
    assert drop_wd_scales(new_opt) > 0 and drop_wd_scales(new_opt) == 0
    with pytest.raises(ValueError, match="reset"):
        grow(model, opt, plan, policy="reset", new_lr_mult=2.0)
    with pytest.raises(ValueError, match="positive"):
        grow(model, opt, plan, new_lr_mult=0.0)


# ------------------------------------------------------------------------------------------------------------
# The vectorised step: routes (torch hand-off, scalar, per element) against references
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["foreach", "fused"])
def test_adamw_hands_uniform_tensors_to_torchs_foreach_or_fused_adamw_bit_for_bit(mode):
    theirs = dict(foreach=True) if mode == "foreach" else dict(fused=True)
    a, opt_a = two_group_run(lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.9, 0.95), **theirs))
    b, opt_b = two_group_run(lambda g: AdamW(g, lr=1e-2, betas=(0.9, 0.95), ages=True, fused=mode == "fused"))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
        assert torch.equal(opt_a.state[p]["exp_avg_sq"], opt_b.state[q]["exp_avg_sq"]), n


ROUTES = {"blocks": {}, "pairs": {"_MAX_BLOCKS": 0}, "direct": {"_MAX_BLOCKS": 0, "_MAX_CLASSES": 0}}


@pytest.mark.parametrize("fused", [False, True])
def test_mixed_age_routes_agree_blocks_pairs_and_per_element(fused):
    """After a growth that mixed ages and lr scales, the three routes for such tensors agree to 1e-6 over several
    steps on the same gradients (so each route's cache must follow the ages from step to step): uniform boxes as
    views (the default; with ``fused``, torch's fused kernel on the contiguous ones), per-(age, lr scale) pairs
    gathered (no boxes allowed), and the direct per-element formula (neither allowed)."""
    import copy

    model, opt = aged_model()
    cfg = model.config
    new, new_opt = grow(model, opt, make_plan("vt", cfg, replace(cfg, d_ff=128, d_model=48, n_head=6,
                                                                 n_kv_head=3)), policy="map+age", lr_adapt="vt")
    twins = {}
    for route, limits in ROUTES.items():
        twin = copy.deepcopy(new)
        twin_opt = AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
        twin_opt.load_state_dict(copy.deepcopy(new_opt.state_dict()))  # (load_state_dict shares same-dtype tensors)
        for name, value in limits.items():
            setattr(twin_opt, name, value)
        twins[route] = (twin, twin_opt)
    for s in range(4):
        train_steps(new, new_opt, 1, seed=s)  # gradients from the first model, copied to its twins
        for route, (twin, twin_opt) in twins.items():
            for p, q in zip(new.parameters(), twin.parameters()):
                q.grad = p.grad.clone() if p.grad is not None else None
            twin_opt.step()
            for (n, p), q in zip(new.named_parameters(), twin.parameters()):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=f"{route}: {n}")
                q.data.copy_(p)  # the next step starts from the same weights, so gradients stay identical
    routed = [p for p in new.parameters() if "age" in new_opt.state[p] or "lr_scale" in new_opt.state[p]]
    assert len(routed) > 10 and len(new_opt._layout_cache) == len(routed)
    kinds = {route: {v[1] and v[1][0] for v in twin_opt._layout_cache.values()}
             for route, (_, twin_opt) in twins.items()}
    assert kinds == {"blocks": {"blocks"}, "pairs": {"pairs"}, "direct": {None}}


@pytest.mark.parametrize("fused", [False, True])
def test_uniform_ages_off_the_step_count_and_uniform_lr_scales_take_the_scalar_route(fused):
    """A tensor whose ages are uniform but differ from its step count, or whose lr scale is one value, updates
    exactly as torch's AdamW (its fused one with ``fused``) at that step / that lr."""
    torch.manual_seed(0)
    p0, grads = torch.randn(3, 5), [torch.randn(3, 5) for _ in range(3)]
    ref = torch.nn.Parameter(p0.clone())
    ref_opt = torch.optim.AdamW([ref], lr=2e-2 * 0.5, weight_decay=0.1, fused=fused)
    ref_opt.state[ref] = {"step": torch.tensor(7.0), "exp_avg": torch.zeros(3, 5), "exp_avg_sq": torch.zeros(3, 5)}
    p = torch.nn.Parameter(p0.clone())
    opt = AdamW([p], lr=2e-2, weight_decay=0.1, fused=fused)
    opt.state[p] = {"step": torch.tensor(2.0), "exp_avg": torch.zeros(3, 5), "exp_avg_sq": torch.zeros(3, 5),
                    "age": torch.full((3, 5), 7.0), "lr_scale": torch.full((3, 5), 0.5)}
    for g in grads:
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(p, ref) and opt.state[p]["step"].item() == 5 and bool((opt.state[p]["age"] == 10).all())


def test_lr_scales_without_ages_and_a_zero_scale():
    """Mixed lr scales without ages (the step count is every element's age); a zero scale freezes its elements
    but for nothing else: the three routes agree."""
    torch.manual_seed(1)
    p0, grads = torch.randn(4, 6), [torch.randn(4, 6) for _ in range(3)]
    scales = torch.tensor([1.0, 0.0, 0.25, 3.0]).repeat_interleave(6).view(4, 6)
    out = []
    for limits in ROUTES.values():
        p = torch.nn.Parameter(p0.clone())
        opt = AdamW([p], lr=1e-2, weight_decay=0.0)
        for name, value in limits.items():
            setattr(opt, name, value)
        opt.state[p] = {"step": torch.tensor(4.0), "exp_avg": torch.zeros(4, 6), "exp_avg_sq": torch.zeros(4, 6),
                        "lr_scale": scales.clone()}
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=1e-7)
    torch.testing.assert_close(out[1], out[2], rtol=0, atol=1e-7)
    assert all(torch.equal(o[1], p0[1]) for o in out)


def test_uniform_blocks_cut_where_neighbours_differ():
    from nanogrow.grow.optim import _uniform_blocks

    age = torch.full((6, 8), 9.0)
    age[4:] = 0.0  # new rows
    age[:, 5:] = 0.0  # new columns
    scale = torch.ones(6, 8)
    scale[:, 5:] = 0.5
    blocks = _uniform_blocks(age, scale, max_blocks=4)
    assert [(b[0], b[1], b[2]) for b in blocks] == [
        ((slice(0, 4), slice(0, 5)), 9.0, 1.0), ((slice(0, 4), slice(5, 8)), 0.0, 0.5),
        ((slice(4, 6), slice(0, 5)), 0.0, 1.0), ((slice(4, 6), slice(5, 8)), 0.0, 0.5)]
    for index, a, s in blocks:
        assert bool((age[index] == a).all()) and bool((scale[index] == s).all())
    assert _uniform_blocks(age, scale, max_blocks=3) is None
    checkerboard = (torch.arange(6)[:, None] + torch.arange(8)) % 2 * 1.0
    assert _uniform_blocks(checkerboard, None, max_blocks=32) is None  # 48 boxes: gathered pairs instead
