"""transformers interop: nanogrow checkpoints export to LlamaForCausalLM with the same logits and greedy tokens,
Llama checkpoints import (and grow) with the same logits, and what Llama cannot express is refused by name."""

import dataclasses
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from nanogrow.checkpoint import load_checkpoint, read_meta, save_checkpoint  # noqa: E402
from nanogrow.config import RunConfig  # noqa: E402
from nanogrow.grow import grow, make_plan  # noqa: E402
from nanogrow.grow.testing import train_steps  # noqa: E402
from nanogrow.hf import HFError, export_hf, export_main, import_hf, import_main, load_model  # noqa: E402
from nanogrow.model import ModelConfig, build_model, rope_tables  # noqa: E402
from nanogrow.train import grow_checkpoint, make_optimizer  # noqa: E402

from helpers import one_thread  # noqa: E402, F401 (autouse fixture: one torch thread per module)

quiet = dict(log=lambda *_: None)


def tiny_cfg(tied: bool = False, **kw) -> ModelConfig:
    # init_std 0.1 spreads the logits (std ~0.8), so greedy argmaxes are not decided by rounding.
    return ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96, vocab_size=128, max_seq_len=32,
                       rope_theta=5000.0, norm_eps=1e-5, tie_embeddings=tied, init_std=0.1, **kw)


def trained_model(cfg: ModelConfig, steps: int):
    """A seeded model and the trainer's AdamW (two param groups) after a few steps on random tokens."""
    model = build_model(cfg, seed=0)
    opt = make_optimizer(model, RunConfig().train)
    train_steps(model, opt, steps)
    return model, opt


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """What `nanogrow prep` leaves that export reads: tokenizer.json (128 words, eot id 0) and meta.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("data")
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "meta.json").write_text(json.dumps({"vocab_size": 128, "eot_id": 0}))
    return d


def save_run(model, opt, out, data_dir=None, step=3, **meta) -> str:
    """A checkpoint as the trainer writes it (the meta keys export and grow_checkpoint read)."""
    run = RunConfig(model=model.config)
    run.data.dir, run.data.seq_len = str(data_dir or "no-such-data-dir"), 16
    m = {"run_config": run.to_dict(), "model_config": dataclasses.asdict(model.config), "loader": None,
         "meter": {"total_tokens": 0, "total_flops": 0.0}, "history": [], "stage_index": 0, "ramp": None,
         "optimizer_ages": bool(getattr(opt, "track_ages", False)), **meta}
    return str(save_checkpoint(out, step, model, opt, m))


def ids(cfg, seed=0, batch=2, seq=12):
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy(model, x, n):
    """nanogrow side: argmax over the full sequence, n times (no cache)."""
    for _ in range(n):
        x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x


@torch.no_grad()
def hf_logits(path, x, **kw):
    hf = transformers.LlamaForCausalLM.from_pretrained(str(path), **kw).eval()
    return hf, hf(x).logits


def assert_same_function(model, hf_dir, seed=0, tol=1e-4):
    x = ids(model.config, seed)
    hf, got = hf_logits(hf_dir, x)
    with torch.no_grad():
        want = model(x)
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= tol
    return hf


@torch.no_grad()
def test_attention_matches_hf_llama_attention_rope_layout_and_gqa():
    """One attention layer on both sides with the same weights: RoPE's rotate_half layout (no q/k permutation),
    GQA head grouping and the 1/sqrt(head_dim) scale agree."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from nanogrow.model import Attention

    cfg = tiny_cfg().resolved()
    hf_cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      rope_theta=5000.0, max_position_embeddings=32, attn_implementation="eager")
    torch.manual_seed(0)
    ours, theirs = Attention(cfg), LlamaAttention(hf_cfg, layer_idx=0)
    for a, b in [("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")]:
        getattr(ours, a).weight.normal_(0, 0.3)
        getattr(theirs, b).weight.copy_(getattr(ours, a).weight)
    T = 12
    x = torch.randn(2, T, 64)
    cos, sin = rope_tables(16, T, 5000.0)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    want = ours(x, cos, sin)
    got, _ = theirs(x, LlamaRotaryEmbedding(hf_cfg)(x, torch.arange(T)[None]), attention_mask=causal)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_matches_transformers_logits_greedy_and_tokenizer(tmp_path, data_dir, tied):
    model, opt = trained_model(tiny_cfg(tied), steps=2)  # trained: norm gains are not all ones
    ckpt = save_run(model, opt, tmp_path / "run", data_dir)
    out = export_hf(ckpt, tmp_path / "hf", **quiet)
    assert ("lm_head.weight" in load_file(str(out / "model.safetensors"))) is not tied

    hf = assert_same_function(model, out)
    assert hf.config.tie_word_embeddings is tied and hf.config.rms_norm_eps == 1e-5
    x = ids(model.config, seed=1, batch=1, seq=5)
    gen = transformers.GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = hf.generate(x, generation_config=gen)  # no eos: exactly 6 tokens, whatever they are
    assert got.tolist() == greedy(model, x, 6).tolist()

    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("w5 w17 w3")["input_ids"] == [5, 17, 3]
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert hf.config.eos_token_id == hf.config.bos_token_id == 0
    assert tok.model_max_length == model.config.max_seq_len
    mask = os.umask(0)
    os.umask(mask)
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == \
        {f.name: 0o666 & ~mask for f in out.iterdir()}  # safetensors alone would write model.safetensors 0600


def test_bf16_export_holds_the_rounded_weights(tmp_path):
    model, opt = trained_model(tiny_cfg(), steps=1)
    # Trained on a GPU with Triton kernels, exported here on CPU; from a run directory (its newest checkpoint).
    save_run(model, opt, tmp_path / "run", model_config={**dataclasses.asdict(model.config), "kernels": "triton"})
    out = export_hf(tmp_path / "run", tmp_path / "hf", dtype="bf16", **quiet)
    sd = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sd["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(sd["model.layers.1.mlp.down_proj.weight"], model.layers["1"].mlp.w_down.weight.bfloat16())
    assert not (out / "tokenizer.json").exists()  # the run's data.dir does not exist: exported without it


def tiny_llama(tmp_path, shard: bool, tied: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                                   initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norm gains to 1; make them matter
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    d = tmp_path / "llama"
    hf.save_pretrained(str(d), max_shard_size="50KB" if shard else "10GB")
    return hf, d


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_import_export_roundtrips_llama(tmp_path, shard):
    hf, src = tiny_llama(tmp_path, shard)
    assert (src / "model.safetensors.index.json").is_file() is shard
    ckpt = import_hf(src, tmp_path / "ng", **quiet)
    model, meta = load_model(ckpt)
    assert meta["step"] == 0 and meta["loader"] is None and meta["model_config"]["rope_theta"] == 5000.0
    x = ids(model.config)
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4

    # The optimizer is fresh: step 0 (DCP would otherwise have stepped it once), zero moments.
    opt = make_optimizer(model, RunConfig.from_dict(meta["run_config"]).train)
    load_checkpoint(ckpt, model, opt, load_rng=False)
    states = list(opt.state.values())
    assert len(states) == len(list(model.parameters()))
    assert all(s["step"].item() == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in states)

    out = export_hf(ckpt, tmp_path / "hf", **quiet)
    want, got = hf.state_dict(), load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert_same_function(model, out)


def test_import_grow_stack_then_export(tmp_path, data_dir):
    hf, src = tiny_llama(tmp_path, shard=False, tied=True)
    (src / "tokenizer.json").write_bytes((data_dir / "tokenizer.json").read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "<|endoftext|>"}))
    ckpt = import_hf(src, tmp_path / "ng", **quiet)
    grown = grow_checkpoint(ckpt, {"n_layer": 4}, "stack", tmp_path / "grown", **quiet)
    meta = read_meta(grown)
    assert meta["model_config"]["n_layer"] == 4 and meta["step"] == 0

    model, _ = load_model(grown)
    sd = hf.state_dict()
    for i in range(4):  # stack: layer i copies layer i mod 2
        assert torch.equal(model.layers[str(i)].attn.wq.weight, sd[f"model.layers.{i % 2}.self_attn.q_proj.weight"])
    opt = make_optimizer(model, RunConfig.from_dict(meta["run_config"]).train, ages=meta["optimizer_ages"])
    load_checkpoint(grown, model, opt, load_rng=False)  # what the trainer does on --resume
    out = export_hf(grown, tmp_path / "hf", **quiet)
    hf2 = assert_same_function(model, out)
    # The tokenizer travelled: import copied it, the run config points at it, export wrapped it with its specials.
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (tok.bos_token, tok.eos_token) == ("w1", "<|endoftext|>")
    assert (hf2.config.bos_token_id, hf2.config.eos_token_id) == (1, 0)


def test_grown_checkpoint_exports_with_its_rescaled_norm_eps(tmp_path):
    model, opt = trained_model(tiny_cfg(), steps=2)
    old = model.config
    new = dataclasses.replace(old, n_layer=4, d_model=96, n_head=6, n_kv_head=3, d_ff=160)
    plan = make_plan("joint", old, new, seed=1, depth_op="stack", width_op="zero")
    model, opt = grow(model, opt, plan, policy="map+age", device="cpu")
    assert model.config.norm_eps == pytest.approx(old.norm_eps * 64 / 96)  # zero-widening d_model rescales eps
    out = export_hf(save_run(model, opt, tmp_path / "run"), tmp_path / "hf", **quiet)
    hf = assert_same_function(model, out)
    assert hf.config.rms_norm_eps == model.config.norm_eps and hf.config.num_hidden_layers == 4


def test_head_growth_past_d_model_divisibility_is_refused_unless_allowed(tmp_path):
    model, opt = trained_model(tiny_cfg(), steps=1)
    plan = make_plan("zero", model.config, dataclasses.replace(model.config, n_head=6, n_kv_head=3), seed=0)
    model, opt = grow(model, opt, plan, policy="map", device="cpu")  # d_model 64, 6 heads of 16
    ckpt = save_run(model, opt, tmp_path / "run")
    with pytest.raises(HFError, match=r"d_model=64 is not divisible by model.n_head=6"):
        export_hf(ckpt, tmp_path / "hf", **quiet)
    assert not (tmp_path / "hf").exists()
    out = export_hf(ckpt, tmp_path / "hf", allow_indivisible_heads=True, **quiet)
    assert json.loads((out / "config.json").read_text())["head_dim"] == 16


def test_export_mid_fade_in_is_refused(tmp_path):
    model, opt = trained_model(tiny_cfg(), steps=1)
    ckpt = save_run(model, opt, tmp_path / "run")
    faded = grow_checkpoint(ckpt, {"d_ff": 128}, "msg", tmp_path / "grown", options={"fade_steps": 10}, **quiet)
    with pytest.raises(HFError, match=r"ckpt_0000003.*middle of a growth fade-in.*Train past step 13"):
        export_hf(faded, tmp_path / "hf", **quiet)
    assert export_main([str(faded), str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 32, "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu"}


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"architectures": ["LlamaModel"]}, "architectures"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters.rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"head_dim": 15}, "head_dim"),
    ({"num_attention_heads": 6}, "head_dim"),  # 64 % 6: no head_dim derivable
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 16}, "sliding_window"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_import_refuses_what_nanogrow_cannot_express(tmp_path, capsys, change, field):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**LLAMA, **change}))
    with pytest.raises(HFError, match=rf"config.json: {field}="):
        import_hf(src, tmp_path / "out", **quiet)
    assert import_main([str(src), "--out", str(tmp_path / "out")]) == 2
    assert f"{field}=" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_import_refuses_missing_or_pickled_weights(tmp_path):
    hf, src = tiny_llama(tmp_path, shard=False)
    sd = load_file(str(src / "model.safetensors"))
    from safetensors.torch import save_file
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFError, match=r"missing tensors: model.layers.1.mlp.up_proj.weight"):
        import_hf(src, tmp_path / "out", **quiet)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(HFError, match=r"only safetensors"):
        import_hf(src, tmp_path / "out", **quiet)
