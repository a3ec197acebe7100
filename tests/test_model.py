import math

import pytest
import torch

from nanogrow.model import ModelConfig, Transformer, build_model

TINY = dict(n_layer=2, d_model=32, n_head=4, n_kv_head=2, vocab_size=97, max_seq_len=16)


@pytest.mark.parametrize("n_kv_head,tie", [(4, False), (2, True), (1, False)])
def test_future_tokens_do_not_change_past_logits(n_kv_head, tie):
    model = build_model(ModelConfig(**{**TINY, "n_kv_head": n_kv_head, "tie_embeddings": tie}), seed=0)
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 13) % 97
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = build_model(ModelConfig(**TINY), seed=0)
    mha = build_model(ModelConfig(**{**TINY, "n_kv_head": 4}), seed=1)
    sd = gqa.state_dict()
    hd = gqa.config.head_dim
    for i in range(2):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attn.{w}.weight"
            sd[key] = sd[key].view(2, hd, 32).repeat_interleave(2, dim=0).reshape(4 * hd, 32)
    mha.load_state_dict(sd)
    idx = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx), atol=1e-5, rtol=0)


def test_param_count_and_flops_match_the_built_model():
    for tie in (False, True):
        cfg = ModelConfig(**{**TINY, "tie_embeddings": tie})
        model = build_model(cfg)
        assert cfg.num_params() == sum(p.numel() for p in model.parameters())
        n = cfg.num_params(include_embedding=False) + (97 * 32 if tie else 0)
        assert cfg.flops_per_token(16) == 6 * n + 12 * 2 * 4 * 8 * 16


def test_meta_build_is_deterministic_and_initialised():
    a, b = build_model(ModelConfig(**TINY), seed=3), build_model(ModelConfig(**TINY), seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
        assert torch.isfinite(p).all()
    assert torch.equal(a.layers["0"].attn_norm.weight, torch.ones(32))
    wo = a.layers["1"].attn.wo.weight
    assert abs(wo.std().item() - 0.02 / math.sqrt(4)) < 0.004  # GPT-2 scaled init of output projections
    assert [k for k in a.state_dict() if "layers.0." in k][0].startswith("layers.0.attn_norm")


def test_loss_is_cross_entropy_of_logits():
    model = build_model(ModelConfig(**TINY))
    idx = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, idx)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits.view(-1, 97), idx.view(-1)))
    assert abs(loss.item() - math.log(97)) < 0.5  # near-uniform at init


@pytest.mark.parametrize("bad,match", [
    (dict(d_model=30, n_head=4), "d_model=30 is not divisible by model.n_head=4"),
    (dict(n_head=4, n_kv_head=3), "n_head=4 is not divisible by model.n_kv_head=3"),
    (dict(n_layer=-1), "model.n_layer must be a non-negative integer"),
])
def test_impossible_shapes_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        Transformer(ModelConfig(**{**TINY, **bad}))


def test_masks_are_state_once_set():
    model = build_model(ModelConfig(**TINY))
    assert "layers.0.mlp.unit_mask" not in model.state_dict()
    model.layers["0"].mlp.unit_mask = torch.ones(model.config.d_ff)
    assert "layers.0.mlp.unit_mask" in model.state_dict()
