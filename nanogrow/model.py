"""A Llama-flavoured decoder: token embedding, pre-norm blocks (RMSNorm -> RoPE attention with grouped-query
heads, RMSNorm -> SwiGLU MLP), final RMSNorm, LM head.

The model knows nothing of parallelism or growth. It is built on the meta device (cheap even when large), moved
with ``to_empty`` and filled by ``init_weights``. Blocks live in a ``ModuleDict`` keyed by ``str(i)`` so parameter
names are stable (``layers.3.mlp.w_up.weight``): inserting a layer is a naming decision, not a re-indexing of
optimizer state.

Growth masks (MSG-style fade-in of new units or blocks) are optional buffers that are ``None`` until a growth
operator sets them; when set they are part of ``state_dict`` and so are checkpointed with the weights.

Generation passes a ``KVCache``: each attention layer appends its new keys and values to it and attends over all
of them, and RoPE positions start at the number of tokens already cached. Without one (training, evaluation) the
forward is the plain causal one.

The elementwise and normalisation steps (RMSNorm, the residual add with its fade-in scale, SwiGLU, RoPE, the
loss) go through ``nanogrow.kernels``: fused Triton kernels when ``ModelConfig.kernels`` allows and the device
can run them, their plain torch references otherwise (``kernels/reference.py`` holds the maths).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogrow import kernels as K
from nanogrow.frozen import Freezable

try:  # flash-attn is a GPU-only optional extra; SDPA is the fallback everywhere.
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # ImportError, or a broken CUDA build
    flash_attn_func = None


@dataclass
class ModelConfig(Freezable):
    """The shape of the model. Every field but ``kernels`` may change when the model grows."""

    n_layer: int = 4  # transformer blocks
    d_model: int = 128  # residual width
    n_head: int = 4  # query heads
    n_kv_head: int = 4  # key/value heads (grouped-query attention when < n_head)
    head_dim: int = 0  # 0: d_model // n_head
    d_ff: int = 0  # 0: SwiGLU's 8/3 * d_model rounded up to a multiple of 32
    vocab_size: int = 8192  # >= the tokenizer's vocabulary
    max_seq_len: int = 256  # longest context (RoPE tables only)
    rope_theta: float = 10000.0  # RoPE base
    tie_embeddings: bool = False  # share the embedding and LM-head matrix
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # std of the normal initialisation
    # Not a shape: "auto" (Triton kernels where they can run, else torch) | "triton" (fail at build without a
    # usable Triton) | "torch". Growth copies the config with dataclasses.replace, so it carries over.
    kernels: str = "auto"

    def resolved(self) -> "ModelConfig":
        """A copy with the derived fields (head_dim, d_ff) filled in."""
        c = ModelConfig(**asdict(self))
        if c.head_dim == 0 and c.n_head > 0 and c.d_model % c.n_head == 0:
            c.head_dim = c.d_model // c.n_head
        if c.d_ff == 0:
            c.d_ff = 32 * math.ceil(8 * c.d_model / 3 / 32)
        return c

    def validate(self, prefix: str = "model") -> None:
        """Raise ValueError naming the key for an impossible shape."""
        # n_layer = 0 is a model of embeddings and head only: the start of zero-layer progressive training
        # (Bu, ICML 2026), grown by inserting blocks (op 'identity').
        if not isinstance(self.n_layer, int) or isinstance(self.n_layer, bool) or self.n_layer < 0:
            raise ValueError(f"{prefix}.n_layer must be a non-negative integer, got {self.n_layer!r}")
        positive = ["d_model", "n_head", "n_kv_head", "vocab_size", "max_seq_len"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{prefix}.{name} must be a positive integer, got {v!r}")
        for name in ["head_dim", "d_ff"]:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{prefix}.{name} must be a non-negative integer (0 = derived), got {v!r}")
        if self.head_dim == 0 and self.d_model % self.n_head != 0:
            raise ValueError(
                f"{prefix}.d_model={self.d_model} is not divisible by {prefix}.n_head={self.n_head} "
                f"(set {prefix}.head_dim explicitly or choose n_head dividing d_model)")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"{prefix}.n_head={self.n_head} is not divisible by {prefix}.n_kv_head={self.n_kv_head} "
                "(grouped-query attention shares each key/value head among n_head/n_kv_head query heads)")
        hd = self.head_dim or self.d_model // self.n_head
        if hd % 2 != 0:
            raise ValueError(f"{prefix}.head_dim={hd} must be even for rotary embeddings")
        if not self.rope_theta > 0:
            raise ValueError(f"{prefix}.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"{prefix}.norm_eps must be > 0, got {self.norm_eps!r}")
        if self.kernels not in K.BACKENDS:
            raise ValueError(f"{prefix}.kernels must be one of {', '.join(map(repr, K.BACKENDS))}, "
                             f"got {self.kernels!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count computed from the shape alone (no model needed)."""
        c = self.resolved()
        q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        per_layer = 2 * c.d_model + c.d_model * (q + 2 * kv) + q * c.d_model + 3 * c.d_model * c.d_ff
        n = c.n_layer * per_layer + c.d_model
        head = 0 if c.tie_embeddings else c.vocab_size * c.d_model
        emb = c.vocab_size * c.d_model
        return n + head + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N + 12 * n_layer * (n_head * head_dim) * T (PaLM appendix B / nanoGPT).

        N counts every weight that takes part in a matmul: all parameters but the input embedding (a lookup),
        plus the LM head's matmul even when it is tied to the embedding. T is the attended context length.
        """
        c = self.resolved()
        t = seq_len if seq_len is not None else c.max_seq_len
        n = self.num_params(include_embedding=False)
        if c.tie_embeddings:
            n += c.vocab_size * c.d_model
        return 6.0 * n + 12.0 * c.n_layer * c.n_head * c.head_dim * t


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: str = "torch"):
        super().__init__()
        self.eps, self.kernels = eps, kernels
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32 for stability under bf16 autocast, returned in the input dtype.
        return K.rms_norm(x, self.weight, self.eps, self.kernels)


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [seq_len, head_dim/2] for rotary embeddings (Su et al.), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos(), freqs.sin()


class KVCache:
    """The keys and values of every position a model has read so far, for generating one token at a time without
    recomputing the prefix: ``model(idx, cache=cache)`` appends the keys and values of ``idx`` to each layer's
    buffers and advances ``length``, which is also where the RoPE positions of the next tokens start. Buffers are
    allocated on first use, ``max_len`` positions long (the model's max_seq_len: RoPE has no angle past it)."""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # per attention layer: [B, max_len, H, D]

    def append(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` [B, T, H, D] at positions length..length+T of ``layer``; all keys and values so far."""
        start, end = self.length, self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {start} + {k.shape[1]} do not fit")
        if layer not in self.kv:
            self.kv[layer] = tuple(t.new_zeros(t.shape[0], self.max_len, *t.shape[2:]) for t in (k, v))
        keys, values = self.kv[layer]
        keys[:, start:end], values[:, start:end] = k, v
        return keys[:, :end], values[:, :end]


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, kernels: str = "torch"):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.kernels = c.n_head, c.n_kv_head, c.head_dim, kernels
        self.wq = nn.Linear(c.d_model, c.n_head * c.head_dim, bias=False)
        self.wk = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.wv = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=False)
        # [n_head] fade-in mask on query heads (MSG-style width growth); None when not growing.
        self.register_buffer("head_mask", None)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        # Rotate pairs (x[..., :d/2], x[..., d/2:]) — the Llama/HF "rotate_half" layout — in fp32.
        q, k = K.rope(q, k, cos, sin, self.kernels)
        mask = None
        if cache is not None:  # attend over the cached positions too: S keys for the T queries
            k, v = cache.append(self, k, v)
            S = k.shape[1]
            if 1 < T < S:  # query t sits at position S - T + t and sees the keys up to it
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        if flash_attn_func is not None and x.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            # [B, T, H, D]; handles GQA natively; with S > T keys its causal mask is aligned to the last query
            y = flash_attn_func(q, k, v, causal=True)
        else:
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                is_causal=k.shape[1] == T, enable_gqa=self.n_kv_head != self.n_head,
            ).transpose(1, 2)
        if self.head_mask is not None:
            y = y * self.head_mask.to(y.dtype)[None, None, :, None]
        return self.wo(y.reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, c: ModelConfig, kernels: str = "torch"):
        super().__init__()
        self.kernels = kernels
        self.w_gate = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.w_up = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.w_down = nn.Linear(c.d_ff, c.d_model, bias=False)
        # [d_ff] fade-in mask on hidden units (MSG-style width growth); None when not growing.
        self.register_buffer("unit_mask", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # silu(gate) * up, times the unit mask when growing (fused into the kernel: no extra pass).
        return self.w_down(K.swiglu(self.w_gate(x), self.w_up(x), self.unit_mask, self.kernels))


class Block(nn.Module):
    def __init__(self, c: ModelConfig, kernels: str = "torch"):
        super().__init__()
        self.kernels = kernels
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps, kernels)
        self.attn = Attention(c, kernels)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps, kernels)
        self.mlp = SwiGLU(c, kernels)
        # Scalar fade-in of a newly inserted block: out = h + m * branch(h), i.e. m * block(h) + (1 - m) * h.
        self.register_buffer("block_mask", None)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                resid_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        # Both branches are scaled by the fade-in masks (None when not growing): h + scale * branch(h).
        scale = resid_mask
        if self.block_mask is not None:
            scale = self.block_mask if scale is None else scale * self.block_mask
        a = self.attn(self.attn_norm(h), cos, sin, cache)
        # The residual add and the MLP's norm in one pass: h = h + scale * a, x = mlp_norm(h).
        h, x = K.add_rms_norm(h, a, scale, self.mlp_norm.weight, self.mlp_norm.eps, self.kernels)
        return K.residual_add(h, self.mlp(x), scale, self.kernels)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = c = config.resolved()
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        # Decided once here: "auto" becomes "torch" where Triton cannot run; "triton" then fails now, not at
        # the first step.
        self.kernels = K.resolve(c.kernels, device=self.tok_emb.weight.device)
        self.layers = nn.ModuleDict({str(i): Block(c, self.kernels) for i in range(c.n_layer)})
        self.norm = RMSNorm(c.d_model, c.norm_eps, self.kernels)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        # [d_model] fade-in mask on residual-stream channels (MSG-style d_model growth); None when not growing.
        self.register_buffer("resid_mask", None)
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, device=self.tok_emb.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Fill every parameter: normal(0, init_std), output projections scaled by 1/sqrt(2 n_layer) (GPT-2),
        norm gains 1. Also (re)computes the RoPE tables, which ``to_empty`` leaves uninitialised."""
        c = self.config
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.tok_emb.weight.device).manual_seed(seed)
        out_std = c.init_std / math.sqrt(2 * max(1, c.n_layer))
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w_down.weight")):
                p.normal_(0.0, out_std, generator=gen)
            else:
                p.normal_(0.0, c.init_std, generator=gen)
        self.reset_rope()

    @torch.no_grad()
    def reset_rope(self) -> None:
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, device=self.tok_emb.weight.device)
        self.rope_cos, self.rope_sin = cos, sin

    @torch.no_grad()
    def set_max_seq_len(self, max_seq_len: int) -> None:
        """Change the context the model accepts (a sequence-length stage raises it): only the RoPE tables depend
        on it, no parameter does. The tables are non-persistent buffers, recomputed here on every process: FSDP2
        shards parameters only and DDP is built without buffer broadcast, so each rank must (and does) call this."""
        if not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        self.config = replace(self.config, max_seq_len=max_seq_len)
        self.reset_rope()

    def output_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx: [B, T] token ids. Returns logits [B, T, V], or the mean cross-entropy when targets are given.
        With a ``cache``, ``idx`` continues the tokens cached so far (at positions cache.length onwards), and the
        cache then holds them too."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence length {start + T} exceeds model.max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        resid_mask = None if self.resid_mask is None else self.resid_mask
        h = self.tok_emb(idx)
        if resid_mask is not None:
            resid_mask = resid_mask.to(h.dtype)
            h = h * resid_mask
        for block in self.layers.values():
            h = block(h, cos, sin, resid_mask, cache)
        if cache is not None:
            cache.length += T
        h = self.norm(h)
        if targets is None:
            return F.linear(h, self.output_weight())
        # cross_entropy(F.linear(h, W).float(), targets); the Triton path never holds all the logits at once.
        return K.linear_cross_entropy(h, self.output_weight(), targets, backend=self.kernels)


def build_model(config: ModelConfig, device: str | torch.device = "cpu", seed: int | None = 0) -> Transformer:
    """Build on the meta device (no memory, no init cost), materialise on ``device``, then initialise."""
    K.resolve(config.kernels, device=device)  # "triton" on a device it cannot serve fails here
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model
