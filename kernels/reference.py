"""Plain torch references of every kernel: the semantics the Triton kernels must reproduce, the path the model
takes with ``kernels = "torch"`` (and with "auto" where Triton cannot run), and, evaluated in fp64, the ground
truth of the kernel tests. Backward passes are torch autograd through these functions.

Reductions and transcendental functions run in at least fp32 (``_acc``): fp32 for fp32/bf16/fp16 inputs, fp64
for fp64 inputs, so that the tests can compute an exact-enough reference with the same code.
"""

import torch
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32, returned in x's dtype."""
    xf = _acc(x)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * _acc(weight)).to(x.dtype)


def residual_add(h: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """A block's residual update h + scale * branch. ``scale`` is the fade-in of grown structure (None = 1):
    a [d_model] channel mask times a block's scalar mask."""
    if scale is not None:
        branch = branch * scale.to(branch.dtype)
    return h + branch


def add_rms_norm(h: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual update followed by the next norm: (h', rms_norm(h')) with h' = h + scale * branch."""
    h = residual_add(h, branch, scale)
    return h, rms_norm(h, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, unit_mask: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up, times the per-hidden-unit fade-in mask ([d_ff], None = 1)."""
    h = F.silu(gate) * up
    if unit_mask is not None:
        h = h * unit_mask.to(h.dtype)
    return h


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x1, x2 = _acc(x[..., :d]), _acc(x[..., d:])
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (Su et al.) of q [B, T, Hq, D] and k [B, T, Hk, D] in the Llama/HF "rotate_half"
    layout: pairs (x[..., i], x[..., i + D/2]) rotated by the angle of position t; cos, sin: [T, D/2]."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the rows whose target is not ``ignore_index``; logits [N, V] upcast to fp32."""
    return F.cross_entropy(_acc(logits), targets, ignore_index=ignore_index)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """cross_entropy(h @ weight.T, targets): the LM head and the loss. h [N, D], weight [V, D]."""
    return cross_entropy(F.linear(h, weight), targets, ignore_index)
