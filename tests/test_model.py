import math

import pytest
import torch
import torch.nn.functional as F

from nanogrow import kernels as K
from nanogrow.model import KVCache, ModelConfig, Transformer, build_model

from helpers import TINY_CACHE_MODEL, masked_model

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


def rand_ids(n, seed=0, batch=2, vocab=97):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# ---- the KV cache: the training forward is the cache-free code, bit for bit -------------------------------------

def legacy_attention(attn, x, cos, sin):
    """Attention.forward as it was before the KV cache (the SDPA path), verbatim."""
    B, T, _ = x.shape
    q = attn.wq(x).view(B, T, attn.n_head, attn.head_dim)
    k = attn.wk(x).view(B, T, attn.n_kv_head, attn.head_dim)
    v = attn.wv(x).view(B, T, attn.n_kv_head, attn.head_dim)
    q, k = K.rope(q, k, cos, sin, attn.kernels)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=attn.n_kv_head != attn.n_head).transpose(1, 2)
    if attn.head_mask is not None:
        y = y * attn.head_mask.to(y.dtype)[None, None, :, None]
    return attn.wo(y.reshape(B, T, attn.n_head * attn.head_dim))


def legacy_forward(model, idx, targets=None):
    """Transformer.forward and Block.forward as they were before the KV cache, verbatim."""
    T = idx.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    resid_mask = model.resid_mask
    h = model.tok_emb(idx)
    if resid_mask is not None:
        resid_mask = resid_mask.to(h.dtype)
        h = h * resid_mask
    for block in model.layers.values():
        scale = resid_mask
        if block.block_mask is not None:
            scale = block.block_mask if scale is None else scale * block.block_mask
        a = legacy_attention(block.attn, block.attn_norm(h), cos, sin)
        h, x = K.add_rms_norm(h, a, scale, block.mlp_norm.weight, block.mlp_norm.eps, block.kernels)
        h = K.residual_add(h, block.mlp(x), scale, block.kernels)
    h = model.norm(h)
    if targets is None:
        return F.linear(h, model.output_weight())
    return K.linear_cross_entropy(h, model.output_weight(), targets, backend=model.kernels)


@pytest.mark.parametrize("masks", [False, True], ids=["plain", "masked"])
def test_training_forward_and_backward_are_bit_identical_to_the_cache_free_code(masks):
    model = masked_model() if masks else build_model(ModelConfig(**TINY_CACHE_MODEL), seed=0)
    x, y = rand_ids(20, seed=2), rand_ids(20, seed=3)
    grads = []
    for forward in (lambda: model(x, y), lambda: legacy_forward(model, x, y)):
        model.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_new, g_new), (loss_old, g_old) = grads
    assert torch.equal(loss_new, loss_old)
    assert all(torch.equal(g_new[n], g_old[n]) for n in g_old)
    with torch.no_grad():
        assert torch.equal(model(x), legacy_forward(model, x))


# ---- the cache computes the full forward ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 4, "tie_embeddings": True}, {"n_kv_head": 1}],
                         ids=["gqa", "mha-tied", "mqa"])
@torch.no_grad()
def test_cached_forward_equals_the_full_forward(kw):
    """A prompt, then one token at a time, then a chunk of several (a causal mask offset by the cache): the logits
    of every position are the full forward's."""
    model = masked_model(**kw)
    seq = rand_ids(16, seed=4)
    want = model(seq)
    cache = KVCache(model.config.max_seq_len)
    got = [model(seq[:, :6], cache=cache)]
    for t in range(6, 10):
        got.append(model(seq[:, t:t + 1], cache=cache))
    got.append(model(seq[:, 10:16], cache=cache))
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=2e-5, rtol=0)


@torch.no_grad()
def test_cache_refuses_what_the_context_cannot_hold():
    model = build_model(ModelConfig(**TINY_CACHE_MODEL), seed=0)
    cache = KVCache(model.config.max_seq_len)
    model(rand_ids(20), cache=cache)
    with pytest.raises(ValueError, match="sequence length 25 exceeds model.max_seq_len=24"):
        model(rand_ids(5), cache=cache)
