"""Interoperation with Hugging Face transformers: export a nanogrow checkpoint as a ``LlamaForCausalLM`` directory,
import a local Llama-family checkpoint as a nanogrow checkpoint that training can start or grow from.

nanogrow's decoder *is* Llama's: pre-norm RMSNorm blocks, grouped-query attention with RoPE in the "rotate_half"
layout (each head rotates the pairs (x[i], x[i + head_dim/2]), as HF's ``apply_rotary_pos_emb``; Meta's original
interleaved-pair checkpoints need a permutation, HF ones and ours do not), SwiGLU MLP, no biases. The mapping is
therefore a renaming of tensors plus a config translation::

    tok_emb.weight                  model.embed_tokens.weight
    layers.{i}.attn_norm.weight     model.layers.{i}.input_layernorm.weight
    layers.{i}.attn.w{q,k,v,o}      model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.mlp_norm.weight      model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.mlp.w_{gate,up,down} model.layers.{i}.mlp.{gate,up,down}_proj.weight
    norm.weight                     model.norm.weight
    lm_head.weight                  lm_head.weight (absent when the embeddings are tied)

What does not map: a checkpoint in the middle of a masked fade-in (Llama has no masks; refused), RoPE scaling
variants, biases, activations other than SiLU, sliding windows (all refused on import, naming the config field).

Only the config and safetensors are read on import (no model is instantiated, nothing is unpickled); transformers
is needed on export only to write the tokenizer files. DCP checkpoints written by several processes (sharded) are
read here by one process exactly like single-process ones: DCP reshards on load.

Entry points: ``export_hf`` / ``import_hf`` (Python), ``export_main`` / ``import_main`` (argv; ``nanogrow export-hf``
and ``nanogrow import-hf``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from . import offline
from .checkpoint import checkpoint_dirs, latest_checkpoint, read_meta, save_checkpoint
from .config import RunConfig, load_config, validate
from .errors import run_reporting_errors  # one policy for one-line errors and NANOGROW_DEBUG
from .grow import make_optimizer
from .grow.fade import MaskRamp, active_masks, set_buffer
from .grow.schema import param_shapes
from .model import ModelConfig, Transformer

# nanogrow per-layer parameter suffix -> HF per-layer suffix (under model.layers.{i}.)
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}

# model_type -> the architectures (class names) whose tensors are laid out as LlamaForCausalLM's.
FAMILY = {"llama": ("LlamaForCausalLM",), "mistral": ("MistralForCausalLM",)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # copied by import: the vocabulary and its specials


class HFError(ValueError):
    """A checkpoint or config that cannot cross between nanogrow and transformers; the message names the path
    and the field at fault."""


def hf_name(name: str) -> str:
    """nanogrow parameter name -> transformers ``LlamaForCausalLM`` state-dict key."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    prefix, i, suffix = name.split(".", 2) if name.startswith("layers.") else ("", "", name)
    if prefix != "layers" or suffix not in LAYER_NAMES:
        raise KeyError(f"{name!r} is not a nanogrow parameter name")
    return f"model.layers.{i}.{LAYER_NAMES[suffix]}"


def param_names(cfg: ModelConfig) -> list[str]:
    """nanogrow parameter names of a model of shape ``cfg``, in ``named_parameters`` order."""
    return list(param_shapes(cfg))


# ---------------------------------------------------------------------------------------------------------------
# Config translation
# ---------------------------------------------------------------------------------------------------------------

def llama_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, bos_token_id: int | None = None,
                 eos_token_id: int | None = None) -> dict:
    """The ``config.json`` of a LlamaForCausalLM with nanogrow shape ``cfg``.

    RoPE is written twice on purpose: ``rope_theta`` + ``rope_scaling: null`` is what transformers 4.x reads,
    ``rope_parameters`` what 5.x reads (it also accepts the 4.x keys); both say plain RoPE with base rope_theta."""
    c = cfg.resolved()
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "initializer_range": c.init_std,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": float(c.rope_theta),
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_theta)},
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": DTYPE_NAMES[dtype],
    }


def model_config_from_hf(hf: dict, where: str = "config.json", max_seq_len: int | None = None) -> ModelConfig:
    """nanogrow ModelConfig of a Llama-family ``config.json``; HFError naming the field for anything nanogrow's
    model would compute differently (RoPE scaling, biases, activation, sliding window, head layout...)."""
    def bad(field: str, why: str) -> HFError:
        return HFError(f"{where}: {field}={hf.get(field)!r}: {why}")

    model_type = hf.get("model_type")
    if model_type not in FAMILY:
        raise bad("model_type", f"not a Llama-family model; nanogrow imports {', '.join(map(repr, FAMILY))}")
    archs = hf.get("architectures") or list(FAMILY[model_type])
    if not isinstance(archs, list) or any(a not in FAMILY[model_type] for a in archs):
        raise bad("architectures", f"nanogrow imports {', '.join(FAMILY[model_type])} (a decoder with its LM head)")
    if hf.get("quantization_config"):
        raise HFError(f"{where}: quantization_config is set: quantized checkpoints are not supported; "
                      "import the full-precision weights")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):
        raise HFError(f"{where}: hidden_act={act!r}: nanogrow's MLP is SwiGLU (silu); other activations are "
                      "not supported")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            raise bad(field, "nanogrow's linear layers have no biases")
    if hf.get("rope_scaling") is not None:
        raise bad("rope_scaling", "RoPE scaling (linear, dynamic, yarn, llama3, longrope...) is not implemented "
                                  "by nanogrow, which only has plain RoPE; it must be null")
    rope_theta = hf.get("rope_theta", 10000.0)
    rp = hf.get("rope_parameters")
    if rp is not None:
        if not isinstance(rp, dict) or "rope_type" not in rp and "type" not in rp and "rope_theta" not in rp:
            raise bad("rope_parameters", "expected one dict of plain RoPE parameters (per-layer-type RoPE is "
                                         "not supported)")
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind != "default":
            raise HFError(f"{where}: rope_parameters.rope_type={kind!r}: nanogrow only implements plain RoPE "
                          "('default'); scaled RoPE variants are not supported")
        if rp.get("partial_rotary_factor", 1.0) != 1.0:
            raise HFError(f"{where}: rope_parameters.partial_rotary_factor={rp['partial_rotary_factor']!r}: "
                          "nanogrow rotates the whole head")
        rope_theta = rp.get("rope_theta", rope_theta)
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise bad("partial_rotary_factor", "nanogrow rotates the whole head")
    max_pos = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    if window is not None and window < (max_seq_len or max_pos):
        raise bad("sliding_window", f"sliding-window attention is not implemented by nanogrow (full causal "
                                    f"attention over max_position_embeddings={max_pos}); it must be null")

    def int_field(field: str, default=None) -> int:
        v = hf.get(field, default)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise bad(field, "must be a positive integer")
        return v

    d_model, n_head = int_field("hidden_size"), int_field("num_attention_heads")
    n_kv = hf.get("num_key_value_heads") or n_head
    if not isinstance(n_kv, int) or n_kv <= 0 or n_head % n_kv:
        raise bad("num_key_value_heads", f"must divide num_attention_heads={n_head} (grouped-query attention)")
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if d_model % n_head:
            raise bad("head_dim", f"not given and hidden_size={d_model} is not divisible by "
                                  f"num_attention_heads={n_head}")
        head_dim = d_model // n_head
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise bad("head_dim", "must be a positive even integer (RoPE rotates pairs)")
    eps = hf.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise bad("rms_norm_eps", "must be > 0")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len <= 0):
        raise HFError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    cfg = ModelConfig(
        n_layer=int_field("num_hidden_layers"), d_model=d_model, n_head=n_head, n_kv_head=n_kv, head_dim=head_dim,
        d_ff=int_field("intermediate_size"), vocab_size=int_field("vocab_size"),
        max_seq_len=max_seq_len or int_field("max_position_embeddings", 2048), rope_theta=float(rope_theta),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=float(eps),
        init_std=float(hf.get("initializer_range", 0.02)))
    try:
        cfg.validate("model")
    except ValueError as e:
        raise HFError(f"{where}: {e}") from None
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    p = Path(path)
    if p.is_dir() and not (p / "meta.json").exists():
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest
    return p


def load_model(path: str | Path) -> tuple[Transformer, dict]:
    """The model of a checkpoint (fp32, CPU, growth masks as saved, reference kernels) and its meta."""
    model, _, meta = offline.load_model(path, kernels="torch")  # "triton" kernels would need a GPU
    return model, meta


def _check_no_fade_in(path: Path, meta: dict, model: Transformer | None = None) -> None:
    """Llama has no growth masks: refuse a checkpoint whose masks are still ramping (or hold values other than 1)."""

    ramp = MaskRamp.from_dict(meta["ramp"]) if meta.get("ramp") else None
    step = meta["step"]
    if ramp is not None and not ramp.done(step):
        end = ramp.start_step + ramp.steps
        raise HFError(f"checkpoint {str(path)!r} is in the middle of a growth fade-in (step {step}; masks "
                      f"{', '.join(sorted(ramp.masks)) or '-'} reach 1 at step {end}): a Llama model cannot "
                      f"represent the masks. Train past step {end} and export a later checkpoint")
    if model is None:
        return
    for name in active_masks(model):
        buf = model.get_buffer(name)
        if ramp is None and not bool((buf == 1).all()):
            raise HFError(f"checkpoint {str(path)!r} carries the growth mask {name!r} with values other than 1 "
                          "and no fade-in schedule; a Llama model cannot represent it")
        set_buffer(model, name, None)  # all ones, or a finished ramp the trainer would remove at the next step


def to_hf_state_dict(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF-named, contiguous copies of every parameter (tied embeddings: no ``lm_head.weight``, as HF saves)."""
    return {hf_name(n): p.detach().to(dtype).contiguous().clone() for n, p in model.named_parameters()}


def tokenizer_source(meta: dict, tokenizer: str | Path | None) -> tuple[Path | None, str]:
    """The tokenizer.json of a checkpoint's run (to export, sample or evaluate with), and why (for the log).
    ``tokenizer``: a file or directory, None for the run's own (``run_config.data.dir/tokenizer.json``)."""
    if tokenizer is not None:
        p = Path(tokenizer)
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            raise HFError(f"--tokenizer {str(tokenizer)!r}: {p} is not a file")
        return p, "given"
    data_dir = (meta.get("run_config") or {}).get("data", {}).get("dir")
    if data_dir and (Path(data_dir) / "tokenizer.json").is_file():
        return Path(data_dir) / "tokenizer.json", f"run's data.dir {data_dir!r}"
    return None, f"run's data.dir {data_dir!r} has no tokenizer.json (from another working directory? use --tokenizer)"


def special_tokens(tok_path: Path) -> tuple[str, str]:
    """(bos, eos) token strings: the prepared data's eot (meta.json eot_id; nanogrow precedes every document with
    it, so it is both), else the tokenizer_config.json's own (an imported HF tokenizer), else a known eot name."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    d = tok_path.parent
    if (d / "meta.json").is_file():
        eot_id = json.loads((d / "meta.json").read_text()).get("eot_id")
        if isinstance(eot_id, int) and tok.id_to_token(eot_id) is not None:
            eot = tok.id_to_token(eot_id)
            return eot, eot
    if (d / "tokenizer_config.json").is_file():
        tc = json.loads((d / "tokenizer_config.json").read_text())
        names = [t.get("content") if isinstance(t, dict) else t for t in (tc.get("bos_token"), tc.get("eos_token"))]
        if names[1] and tok.token_to_id(names[1]) is not None:
            bos = names[0] if names[0] and tok.token_to_id(names[0]) is not None else names[1]
            return bos, names[1]
    from .data_prep.tokenizer import find_eot
    try:
        eot = tok.id_to_token(find_eot(tok, str(tok_path)))
    except ValueError as e:
        raise HFError(f"{e}; cannot choose the bos/eos token") from None
    return eot, eot


def _write_tokenizer(tok_path: Path, out: Path, vocab_size: int, max_seq_len: int | None = None) -> tuple[int, int]:
    """Save ``tok_path`` as a PreTrainedTokenizerFast in ``out`` (``model_max_length`` = the model's context, so
    transformers warns about over-long inputs); returns (bos_token_id, eos_token_id)."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise HFError("writing the tokenizer needs transformers (pip install 'nanogrow[hf]'); or export without "
                      "it with --no-tokenizer") from None
    bos, eos = special_tokens(tok_path)
    extra = {"model_max_length": max_seq_len} if max_seq_len else {}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), bos_token=bos, eos_token=eos, **extra)
    n = len(tok)
    if n > vocab_size:
        raise HFError(f"tokenizer {str(tok_path)!r} has {n} tokens but the model's vocab_size is {vocab_size}: "
                      "it would produce ids outside the embedding (wrong tokenizer? use --tokenizer)")
    tok.save_pretrained(str(out))
    return tok.convert_tokens_to_ids(bos), tok.convert_tokens_to_ids(eos)


def _normal_modes(directory: Path) -> None:
    """safetensors writes its file 0600; every exported file gets the mode a plain write would (0666 - umask)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32", tokenizer: str | Path | None = None,
              with_tokenizer: bool = True, overwrite: bool = False, allow_indivisible_heads: bool = False,
              log=print) -> Path:
    """Write ``out_dir`` as a transformers Llama checkpoint (config.json, model.safetensors, tokenizer files when
    the tokenizer is known) from a nanogrow checkpoint (or the newest checkpoint of a run directory), grown or
    not. The directory is written as ``out_dir.tmp`` and renamed when complete."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise HFError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve_checkpoint(checkpoint)
    meta = read_meta(path)
    cfg = ModelConfig(**meta["model_config"]).resolved()
    _check_no_fade_in(path, meta)  # before reading any tensor
    if cfg.d_model % cfg.n_head and not allow_indivisible_heads:
        # Reachable by growing n_head with head_dim fixed. The layout is valid Llama (explicit head_dim), but
        # transformers 5's LlamaConfig validator rejects hidden_size % num_attention_heads != 0 regardless.
        raise HFError(f"checkpoint {str(path)!r}: model.d_model={cfg.d_model} is not divisible by "
                      f"model.n_head={cfg.n_head} (head_dim={cfg.head_dim}); transformers' LlamaConfig (5.x) "
                      "refuses hidden_size % num_attention_heads != 0 even with an explicit head_dim. Pass "
                      "--allow-indivisible-heads to write it anyway for loaders that accept it")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HFError(f"output {str(out)!r} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HFError(f"output directory {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    tok_path, why = tokenizer_source(meta, tokenizer) if with_tokenizer else (None, "--no-tokenizer")

    model, meta = load_model(path)
    _check_no_fade_in(path, meta, model)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        bos = eos = None
        if tok_path is not None:
            bos, eos = _write_tokenizer(tok_path, tmp, cfg.vocab_size, cfg.max_seq_len)
        tensors = to_hf_state_dict(model, DTYPES[dtype])
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_cfg = llama_config(cfg, DTYPES[dtype], bos, eos)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _normal_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    n = sum(t.numel() for t in tensors.values())
    log(f"exported {path} (step {meta['step']}, {cfg.n_layer} x {cfg.d_model}, {n:,} params, {dtype}) to {out}; "
        f"tokenizer: {'written from ' + str(tok_path) if tok_path else 'none (' + why + ')'}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------------------

def _weight_files(src: Path) -> dict[str, Path]:
    """HF key -> safetensors file holding it (one file, or shards listed by model.safetensors.index.json)."""
    from safetensors import safe_open

    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise HFError(f"{index}: not a safetensors index (weight_map): {e}") from None
        files = {k: src / f for k, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise HFError(f"{index} lists {f.name}, which is missing")
        return files
    single = src / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    if any(src.glob("*.bin")) or any(src.glob("*.pt")):
        raise HFError(f"{src}: only safetensors weights are read (pickled .bin/.pt files are not unpickled); "
                      "convert them with transformers' save_pretrained(..., safe_serialization=True)")
    raise HFError(f"{src}: no model.safetensors or model.safetensors.index.json")


def _load_hf_weights(model: Transformer, files: dict[str, Path], where: Path) -> str:
    """Copy every parameter from the safetensors files into ``model`` (cast to its dtype); returns the stored
    dtype. Unknown tensors are an error (they would be silently lost); RoPE inv_freq buffers are ignored."""
    from safetensors import safe_open

    cfg = model.config
    params = dict(model.named_parameters())
    wanted = {hf_name(n): n for n in params}
    ignored = {k for k in files if k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        ignored |= {"lm_head.weight"} & set(files)  # tied: HF uses the embedding whatever is stored
    unknown = sorted(set(files) - set(wanted) - ignored)
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise HFError(f"{where}: tensors that a Llama of this config does not have: {', '.join(unknown[:5])}{more}")
    missing = sorted(set(wanted) - set(files))
    if missing:
        hint = " (config.json says tie_word_embeddings=false)" if missing == ["lm_head.weight"] else ""
        raise HFError(f"{where}: missing tensors: {', '.join(missing[:5])}{hint}")
    stored = set()
    by_file: dict[Path, list[str]] = {}
    for key in wanted:
        by_file.setdefault(files[key], []).append(key)
    with torch.no_grad():
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt") as sf:
                for key in keys:
                    t = sf.get_tensor(key)
                    p = params[wanted[key]]
                    if tuple(t.shape) != tuple(p.shape):
                        raise HFError(f"{f}: {key} has shape {tuple(t.shape)}, but config.json implies "
                                      f"{tuple(p.shape)} (hidden_size, num_attention_heads, num_key_value_heads, "
                                      "head_dim, intermediate_size, vocab_size)")
                    p.copy_(t)
                    stored.add(str(t.dtype).removeprefix("torch."))
    return ",".join(sorted(stored))


def _model_toml(cfg: ModelConfig) -> str:
    lines = ["# The [model] section of the imported checkpoint. A run that starts from it must use exactly this",
             "# section (the trainer checks the shape a resumed run started from).", "[model]"]
    for k, v in dataclasses.asdict(cfg).items():
        lines.append(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}")
    return "\n".join(lines) + "\n"


def import_hf(src: str | Path, out_dir: str | Path, run_config=None, max_seq_len: int | None = None,
              log=print) -> Path:
    """Turn a local Llama-family HF checkpoint (config.json + safetensors, sharded or not) into the nanogrow
    checkpoint ``out_dir/ckpt_0000000`` (step 0, fresh AdamW, no loader state) that training can start from or
    ``nanogrow grow`` can grow. ``run_config``: a RunConfig whose train section builds the optimizer (its model
    section is replaced by the imported shape); default RunConfig(). Also writes ``out_dir/model.toml`` (the
    [model] section to train with) and copies the tokenizer files, if any. Returns the checkpoint path."""

    s = Path(src)
    if not (s / "config.json").is_file():
        raise HFError(f"{str(s)!r} is not a Hugging Face model directory (no config.json)")
    try:
        hf = json.loads((s / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{s / 'config.json'}: invalid JSON: {e}") from None
    cfg = model_config_from_hf(hf, str(s / "config.json"), max_seq_len=max_seq_len)
    files = _weight_files(s)
    out = Path(out_dir)
    if checkpoint_dirs(out):
        raise HFError(f"{str(out)!r} already holds checkpoints; import into an empty directory")

    run = _imported_run_config(run_config or RunConfig(), cfg, out)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    stored = _load_hf_weights(model, files, s)
    model.reset_rope()
    optimizer = make_optimizer(model, run.train)
    optimizer.init_state()
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (s / name).is_file():
            shutil.copyfile(s / name, out / name)
            copied.append(name)
    (out / "model.toml").write_text(_model_toml(cfg))
    meta = {
        "run_config": run.to_dict(),
        "model_config": dataclasses.asdict(cfg),
        "loader": None,  # no data consumed yet: a run starting here starts its data stream at the beginning
        "meter": {"total_tokens": 0, "total_flops": 0.0},
        "history": [{"event": "import", "step": 0, "source": str(s.resolve()), "model_type": hf.get("model_type"),
                     "dtype": stored, "params": cfg.num_params()}],
        "stage_index": 0,
        "ramp": None,
        "optimizer_ages": False,
    }
    path = save_checkpoint(out, 0, model, optimizer, meta, keep_last=1)
    log(f"imported {s} ({hf.get('model_type')}, {cfg.n_layer} x {cfg.d_model}, heads {cfg.n_head}/{cfg.n_kv_head}, "
        f"{cfg.num_params():,} params, stored {stored} -> float32) to {path}; "
        f"tokenizer: {', '.join(copied) or 'none found'}; [model] section in {out / 'model.toml'}")
    return path


def _imported_run_config(run, cfg: ModelConfig, out: Path):
    """``run`` with the imported model shape, data.dir pointing at the copied tokenizer and a sequence length
    the model can take; validated."""

    d = run.to_dict()
    d["model"] = dataclasses.asdict(cfg)
    d["data"]["dir"] = str(out.resolve())
    d["data"]["seq_len"] = min(d["data"]["seq_len"], cfg.max_seq_len)
    new = RunConfig.from_dict(d, source="import")
    validate(new)
    return new


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def _run(prog: str, fn, args) -> int:
    return run_reporting_errors(prog, lambda a: fn(a) and None, args)


def export_main(argv: list[str]) -> int:
    """``nanogrow export-hf CKPT OUT``."""
    p = argparse.ArgumentParser(prog="nanogrow export-hf",
                                description="Write a nanogrow checkpoint as a transformers LlamaForCausalLM directory.")
    p.add_argument("checkpoint", help="a checkpoint directory (ckpt_XXXXXXX), or a run directory (its newest)")
    p.add_argument("out", help="output directory (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights' dtype in model.safetensors")
    p.add_argument("--tokenizer", help="tokenizer.json (or a directory holding one); default: the run's "
                                       "data.dir/tokenizer.json")
    p.add_argument("--no-tokenizer", action="store_true", help="write only the model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--allow-indivisible-heads", action="store_true",
                   help="write a model whose d_model is not divisible by n_head (transformers 5 refuses to load it)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="open a DeepSpeed checkpoint whose signature does not verify under this host's key (one "
                        "written elsewhere): DeepSpeed unpickles its files, which runs any code they hold")
    args = p.parse_args(argv)
    if args.trust_checkpoint:  # read where the checkpoint is opened (checkpoint.check_deepspeed_trusted)
        from .integrity import TRUST_ENV
        os.environ[TRUST_ENV] = "1"
    return _run(p.prog, lambda a: export_hf(a.checkpoint, a.out, dtype=a.dtype, tokenizer=a.tokenizer,
                                            with_tokenizer=not a.no_tokenizer, overwrite=a.overwrite,
                                            allow_indivisible_heads=a.allow_indivisible_heads), args)


def import_main(argv: list[str]) -> int:
    """``nanogrow import-hf PATH --out DIR``."""
    p = argparse.ArgumentParser(prog="nanogrow import-hf",
                                description="Turn a local Llama-family HF checkpoint into a nanogrow checkpoint "
                                            "(step 0, fresh optimizer) to train or grow from.")
    p.add_argument("path", help="HF model directory (config.json + model.safetensors or a sharded index)")
    p.add_argument("--out", required=True, help="directory to write ckpt_0000000 (and tokenizer files) into")
    p.add_argument("--config", "-c", help="TOML run config whose [train] settings build the optimizer "
                                          "(its [model] is replaced by the imported shape)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--max-seq-len", type=int, help="model.max_seq_len (default: max_position_embeddings)")
    args = p.parse_args(argv)

    def run(a):
        cfg = load_config(a.config, a.overrides) if (a.config or a.overrides) else None
        import_hf(a.path, a.out, run_config=cfg, max_seq_len=a.max_seq_len)

    return _run(p.prog, run, args)
