"""The model's parameter schema as growth sees it: which fields may grow and which must stay, every parameter's
shape for a ModelConfig (``param_shapes``, the order ``Transformer.named_parameters`` gives), the fade-in mask
buffers, the shape checks every operator starts with, operator-option checks and the seed derivation of fresh
pieces. No tensors: pure functions of configs."""

from __future__ import annotations

import hashlib
import inspect
from typing import Callable

from nanogrow.model import ModelConfig

# Fields that describe the shape and may grow; fields that must stay equal across a growth event.
SHAPE_FIELDS = ("n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "d_ff")
FIXED_FIELDS = ("vocab_size", "max_seq_len", "rope_theta", "tie_embeddings")

LAYER_PARAMS = (
    "attn_norm.weight", "attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight",
    "mlp_norm.weight", "mlp.w_gate.weight", "mlp.w_up.weight", "mlp.w_down.weight",
)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of ``Transformer(cfg)``, in ``named_parameters`` order."""
    c = cfg.resolved()
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (c.vocab_size, c.d_model)}
    per_layer = {
        "attn_norm.weight": (c.d_model,), "attn.wq.weight": (q, c.d_model), "attn.wk.weight": (kv, c.d_model),
        "attn.wv.weight": (kv, c.d_model), "attn.wo.weight": (c.d_model, q), "mlp_norm.weight": (c.d_model,),
        "mlp.w_gate.weight": (c.d_ff, c.d_model), "mlp.w_up.weight": (c.d_ff, c.d_model),
        "mlp.w_down.weight": (c.d_model, c.d_ff),
    }
    for i in range(c.n_layer):
        for suffix in LAYER_PARAMS:
            shapes[f"layers.{i}.{suffix}"] = per_layer[suffix]
    shapes["norm.weight"] = (c.d_model,)
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.d_model)
    return shapes


def mask_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every growth-mask buffer the model can carry."""
    c = cfg.resolved()
    out: dict[str, tuple[int, ...]] = {"resid_mask": (c.d_model,)}
    for i in range(c.n_layer):
        out[f"layers.{i}.block_mask"] = ()
        out[f"layers.{i}.attn.head_mask"] = (c.n_head,)
        out[f"layers.{i}.mlp.unit_mask"] = (c.d_ff,)
    return out


def shape_dict(cfg: ModelConfig) -> dict:
    c = cfg.resolved()
    return {k: getattr(c, k) for k in SHAPE_FIELDS}


def check_growth(old: ModelConfig, new: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    """Validate a growth old -> new and return resolved copies. Raises ValueError naming the key."""
    if not isinstance(old, ModelConfig) or not isinstance(new, ModelConfig):
        raise ValueError(f"old and new configs must be ModelConfig, got {type(old).__name__}, {type(new).__name__}")
    old.validate("old"), new.validate("new")
    o, n = old.resolved(), new.resolved()
    for k in FIXED_FIELDS:
        if getattr(o, k) != getattr(n, k):
            raise ValueError(f"{k} cannot change across growth (old {getattr(o, k)!r}, new {getattr(n, k)!r})")
    for k in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff"):
        if getattr(n, k) < getattr(o, k):
            raise ValueError(f"growth cannot shrink {k}: old {getattr(o, k)}, new {getattr(n, k)}")
    if n.head_dim != o.head_dim:
        raise ValueError(
            f"head_dim cannot change across growth (old {o.head_dim}, new {n.head_dim}): RoPE frequencies depend "
            "on it. Grow n_head together with d_model, or set head_dim explicitly")
    g_old, g_new = o.n_head // o.n_kv_head, n.n_head // n.n_kv_head
    if g_new < g_old:
        raise ValueError(
            f"query heads per kv group cannot shrink (old n_head/n_kv_head={g_old}, new {g_new}): every old query "
            "head must stay in its old key/value group")
    return o, n


def keyword_options(operator: Callable) -> list[str]:
    """The keyword options an operator function accepts (its keyword-only parameters)."""
    sig = inspect.signature(operator)
    return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def check_options(op: str, operator: Callable, options: dict, where: str = "options") -> None:
    """ValueError naming the first option ``operator`` (registered as ``op``) does not take."""
    valid = keyword_options(operator)
    for k in options:
        if k not in valid:
            raise ValueError(f"unknown option {k!r} for growth operator {op!r} (in {where}); valid options: "
                             f"{', '.join(valid) or 'none'}")


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from anything printable: same inputs, same seed, on every process and platform."""
    h = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)
