"""The Triton kernels as torch custom operators (``torch.ops.nanogrow.*``): each has a fake implementation (shapes
and dtypes only, for torch.compile / FSDP2 tracing on meta and fake tensors) and an autograd formula whose
backward is itself a custom operator, so a compiled graph sees two opaque, correctly-shaped calls per kernel.

Ops take contiguous tensors [..., width] prepared by the dispatching functions in ``__init__.py`` and return
tensors of the same shape (not views: FSDP2 warns about modules that return views). Triton itself is imported
on the first call (``triton_kernels``), never when this module is imported.

No ``from __future__ import annotations`` here: ``custom_op`` reads the type annotations to build the schema.
"""

from typing import Optional

import torch
from torch import Tensor


def _tk():
    from . import triton_kernels
    return triton_kernels


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


# ----------------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("nanogrow::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _, y, rstd = _tk().rms_norm_fwd(x, weight, eps)
    return y, rstd


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("nanogrow::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    dx, _, dw = _tk().rms_norm_bwd(dy.contiguous(), x, weight, rstd)
    return dx, dw


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw, None


torch.library.register_autograd("nanogrow::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup)


# ----------------------------------------------------------------------------------------------------------
# Residual add (with the fade-in scale) fused with the following RMSNorm
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("nanogrow::add_rms_norm", mutates_args=())
def add_rms_norm(h: Tensor, branch: Tensor, scale: Optional[Tensor], weight: Tensor,
                 eps: float) -> tuple[Tensor, Tensor, Tensor]:
    h_out, y, rstd = _tk().rms_norm_fwd(h, weight, eps, branch=branch, scale=scale,
                                        h_dtype=torch.promote_types(h.dtype, branch.dtype))
    return h_out, y, rstd


@add_rms_norm.register_fake
def _(h, branch, scale, weight, eps):
    dt = torch.promote_types(h.dtype, branch.dtype)
    rows = h.numel() // h.shape[-1]
    return h.new_empty(h.shape, dtype=dt), h.new_empty(h.shape, dtype=dt), h.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("nanogrow::add_rms_norm_bwd", mutates_args=())
def add_rms_norm_bwd(dh_out: Tensor, dy: Tensor, h_out: Tensor, weight: Tensor, rstd: Tensor,
                     scale: Optional[Tensor], branch_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(d h', d branch, d weight). Without a scale the branch's gradient equals h's, so none is written
    (an empty tensor is returned and the autograd formula reuses d h')."""
    dx, db, dw = _tk().rms_norm_bwd(dy.contiguous(), h_out, weight, rstd, dres=dh_out.contiguous(), scale=scale,
                                    branch_dtype=branch_dtype)
    return dx, (db if db is not None else _empty(dx)), dw


@add_rms_norm_bwd.register_fake
def _(dh_out, dy, h_out, weight, rstd, scale, branch_dtype):
    db = h_out.new_empty(h_out.shape, dtype=branch_dtype) if scale is not None else _empty(h_out)
    return torch.empty_like(h_out), db, torch.empty_like(weight)


def _add_rms_norm_setup(ctx, inputs, output):
    h, branch, scale, weight, _ = inputs
    ctx.branch_dtype = branch.dtype
    ctx.save_for_backward(output[0], weight, output[2], scale)


def _add_rms_norm_backward(ctx, dh_out, dy, _drstd):
    h_out, weight, rstd, scale = ctx.saved_tensors
    dh, dbranch, dw = add_rms_norm_bwd(dh_out, dy, h_out, weight, rstd, scale, ctx.branch_dtype)
    return dh, (dh if scale is None else dbranch), None, dw, None


torch.library.register_autograd("nanogrow::add_rms_norm", _add_rms_norm_backward, setup_context=_add_rms_norm_setup)


# ----------------------------------------------------------------------------------------------------------
# Block output: h + branch * scale (also the backward of itself: d branch = d out * scale)
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("nanogrow::scaled_add", mutates_args=())
def scaled_add(h: Optional[Tensor], branch: Tensor, scale: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    return _tk().scaled_add(h, branch, scale, out_dtype)


@scaled_add.register_fake
def _(h, branch, scale, out_dtype):
    return branch.new_empty(branch.shape, dtype=out_dtype)


def _scaled_add_setup(ctx, inputs, output):
    h, branch, scale, _ = inputs
    ctx.has_h, ctx.branch_dtype = h is not None, branch.dtype
    ctx.save_for_backward(scale)


def _scaled_add_backward(ctx, dout):
    (scale,) = ctx.saved_tensors
    dbranch = dout if scale is None else scaled_add(None, dout.contiguous(), scale, ctx.branch_dtype)
    return (dout if ctx.has_h else None), dbranch, None, None


torch.library.register_autograd("nanogrow::scaled_add", _scaled_add_backward, setup_context=_scaled_add_setup)


# ----------------------------------------------------------------------------------------------------------
# SwiGLU with the per-unit fade-in mask
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("nanogrow::swiglu", mutates_args=())
def swiglu(gate: Tensor, up: Tensor, unit_mask: Optional[Tensor]) -> Tensor:
    return _tk().swiglu_fwd(gate, up, unit_mask)


@swiglu.register_fake
def _(gate, up, unit_mask):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@torch.library.custom_op("nanogrow::swiglu_bwd", mutates_args=())
def swiglu_bwd(dh: Tensor, gate: Tensor, up: Tensor, unit_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _tk().swiglu_bwd(dh.contiguous(), gate, up, unit_mask)


@swiglu_bwd.register_fake
def _(dh, gate, up, unit_mask):
    return torch.empty_like(gate), torch.empty_like(up)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # silu(gate) is recomputed in the backward rather than stored


def _swiglu_backward(ctx, dh):
    gate, up, unit_mask = ctx.saved_tensors
    dg, du = swiglu_bwd(dh, gate, up, unit_mask)
    return dg, du, None


torch.library.register_autograd("nanogrow::swiglu", _swiglu_backward, setup_context=_swiglu_setup)


# ----------------------------------------------------------------------------------------------------------
# Rotary embedding of q and k (the backward is the inverse rotation: the same op with inverse=True)
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("nanogrow::rope", mutates_args=())
def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    return _tk().rope(q, k, cos, sin, inverse)


@rope.register_fake
def _(q, k, cos, sin, inverse):
    return torch.empty_like(q), torch.empty_like(k)


def _rope_setup(ctx, inputs, output):
    _, _, cos, sin, inverse = inputs
    ctx.inverse = inverse
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = rope(dq.contiguous(), dk.contiguous(), cos, sin, not ctx.inverse)
    return dq, dk, None, None, None


torch.library.register_autograd("nanogrow::rope", _rope_backward, setup_context=_rope_setup)


# ----------------------------------------------------------------------------------------------------------
# Cross-entropy over the vocabulary in chunks: per-row losses (the mean is taken by the caller in torch)
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("nanogrow::cross_entropy", mutates_args=())
def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    return _tk().cross_entropy_fwd(logits, targets, ignore_index)


@cross_entropy.register_fake
def _(logits, targets, ignore_index):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("nanogrow::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(logits: Tensor, targets: Tensor, lse: Tensor, dloss: Tensor, ignore_index: int) -> Tensor:
    return _tk().cross_entropy_bwd(logits, targets, lse, dloss.contiguous(), ignore_index)


@cross_entropy_bwd.register_fake
def _(logits, targets, lse, dloss, ignore_index):
    return torch.empty_like(logits)


def _ce_setup(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    ctx.ignore_index = ignore_index
    ctx.save_for_backward(logits, targets, output[1])


def _ce_backward(ctx, dloss, _dlse):
    logits, targets, lse = ctx.saved_tensors
    return cross_entropy_bwd(logits, targets, lse, dloss, ctx.ignore_index), None, None


torch.library.register_autograd("nanogrow::cross_entropy", _ce_backward, setup_context=_ce_setup)


# ----------------------------------------------------------------------------------------------------------
# LM head + cross-entropy, chunked over rows so that the [tokens, vocab] logits never exist at once
# ----------------------------------------------------------------------------------------------------------

def _chunk_rows(n: int, d: int, v: int) -> int:
    """Rows per chunk so that a chunk of logits ([rows, V]) is about as large as h ([n, D]) (Liger-Kernel)."""
    return max(1, -(-n // max(1, -(-v // d))))


@torch.library.custom_op("nanogrow::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                         compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy of h @ weight.T, and (if ``compute_grad``) its gradients with respect to h and weight,
    computed chunk by chunk during the forward (the backward only scales them by the incoming gradient).
    Each chunk's logits are overwritten in place by their gradient. Without ``compute_grad`` the gradients
    are empty tensors."""
    tk = _tk()
    n, d = h.shape
    v = weight.shape[0]
    n_valid = (targets != ignore_index).sum()
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if compute_grad else _empty(h)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if compute_grad else _empty(weight)
    inv_n = 1.0 / max(int(n_valid), 1)  # 0 valid targets: loss 0/0 = nan like torch, gradients 0
    step = _chunk_rows(n, d, v)
    for start in range(0, n, step):
        hc, tc = h[start:start + step], targets[start:start + step]
        logits = hc @ weight.t()
        rows, lse = tk.cross_entropy_fwd(logits, tc, ignore_index)
        loss += rows.sum()
        if compute_grad:
            dlogits = tk.cross_entropy_bwd(logits, tc, lse, None, ignore_index, scale=inv_n, out=logits)
            torch.mm(dlogits, weight, out=dh[start:start + step])
            if dw.dtype == dlogits.dtype:
                dw.addmm_(dlogits.t(), hc)
            else:  # bf16/fp16: products in the input dtype, the sum over chunks in fp32
                dw += (dlogits.t() @ hc).float()
    return loss / n_valid, dh, (dw.to(weight.dtype) if compute_grad else dw)


@linear_cross_entropy.register_fake
def _(h, weight, targets, ignore_index, compute_grad):
    if not compute_grad:
        return h.new_empty((), dtype=torch.float32), _empty(h), _empty(weight)
    return h.new_empty((), dtype=torch.float32), torch.empty_like(h), torch.empty_like(weight)


def _lce_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _lce_backward(ctx, dloss, _ddh, _ddw):
    dh, dw = ctx.saved_tensors
    if dh.numel() == 0 and dw.numel() == 0:
        raise RuntimeError("linear_cross_entropy was called with compute_grad=False; cannot backpropagate")
    return dh * dloss.to(dh.dtype), dw * dloss.to(dw.dtype), None, None, None


torch.library.register_autograd("nanogrow::linear_cross_entropy", _lce_backward, setup_context=_lce_setup)
