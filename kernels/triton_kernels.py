"""The Triton kernels and their launchers. Imported lazily (``nanogrow.kernels.dispatch.load_triton``), only when
a model or a caller actually asks for Triton, so that ``import nanogrow.model`` never needs Triton.

Every kernel takes any width: the column block is the next power of two and the tail is masked, so the widths a
growing model passes through (d_model 80, d_ff 200, ...) need no padding; a growth event only costs a recompile
when it crosses a power of two. Arithmetic is in fp32 whatever the storage dtype; results are rounded once.

Under ``TRITON_INTERPRET=1`` (read by Triton when the ``@triton.jit`` functions below are defined, i.e. when
this module is imported) the same kernels run on CPU tensors through Triton's interpreter; that is how the tests
check them on a machine without a GPU. ``INTERPRET`` records which kind this process got.

Inputs are contiguous (the dispatcher sees to it) of any shape [..., N], addressed as [rows, N]; offsets are
computed in int64 so a [tokens, vocab] tensor larger than 2**31 elements is addressed correctly.
"""

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)  # were the kernels below defined for the interpreter?

ELEMENTWISE_BLOCK = 1024


def _warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def _row_programs(n_rows: int, device: torch.device) -> int:
    """Programs for the row-looping backward kernels (each one accumulates a partial weight gradient)."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 2))  # the interpreter pays per program instance


# ----------------------------------------------------------------------------------------------------------
# RMSNorm, optionally fused with the residual add that precedes it: h' = h + branch * scale; y = norm(h') * w
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_fwd_kernel(X, BR, S, W, H_OUT, Y, RSTD, N, eps,
                         HAS_BRANCH: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * N + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        b = tl.load(BR + row * N + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_SCALE:
            b = b * tl.load(S + cols, mask=m, other=0.0)
        h = (x + b).to(H_OUT.dtype.element_ty)
        tl.store(H_OUT + row * N + cols, h, mask=m)
        x = h.to(tl.float32)  # normalise the residual stream as stored, like the reference does
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DRES, S, DX, DB, DW, n_rows, N, rows_per_program,
                         HAS_DRES: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """dx = rstd * (w*dy - xhat * mean(xhat * w*dy)) (+ the residual stream's own gradient DRES);
    with a fused residual add the branch gets dx * scale. dw is accumulated per program in fp32."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s = tl.load(S + cols, mask=m, other=0.0)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 loop variable: row * N may exceed 2**31
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r in range(row_start, row_end):
        off = r * N + cols
        dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
        x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        xhat = x * rstd
        wdy = w * dy
        dw += dy * xhat
        dx = (wdy - xhat * (tl.sum(xhat * wdy, axis=0) / N)) * rstd
        if HAS_DRES:
            dx += tl.load(DRES + off, mask=m, other=0.0).to(tl.float32)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)
        if HAS_SCALE:
            tl.store(DB + off, (dx * s).to(DB.dtype.element_ty), mask=m)
    tl.store(DW + pid.to(tl.int64) * N + cols, dw, mask=m)


def rms_norm_fwd(x, weight, eps, branch=None, scale=None, h_dtype=None):
    """Returns (h', y, rstd); h' is None without a branch. x, branch: [..., N]; scale: [N] fp32 or None."""
    n = x.shape[-1]
    rows = x.numel() // n
    h_out = None
    if branch is not None:
        h_out = torch.empty(x.shape, dtype=h_dtype, device=x.device)
    y = torch.empty(x.shape, dtype=x.dtype if h_out is None else h_out.dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n)
    _rms_norm_fwd_kernel[(rows,)](x, branch, scale, weight, h_out, y, rstd, n, eps,
                                  HAS_BRANCH=branch is not None, HAS_SCALE=scale is not None, BLOCK=block,
                                  num_warps=_warps(block))
    return h_out, y, rstd


def rms_norm_bwd(dy, x, weight, rstd, dres=None, scale=None, branch_dtype=None):
    """Returns (dx, dbranch or None, dw). x is the normalised input (h' for the fused add)."""
    n = x.shape[-1]
    rows = x.numel() // n
    dx = torch.empty_like(x)
    db = torch.empty(x.shape, dtype=branch_dtype, device=x.device) if scale is not None else None
    progs = _row_programs(rows, x.device)
    per = triton.cdiv(rows, progs)
    dw_part = torch.empty((progs, n), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n)
    _rms_norm_bwd_kernel[(progs,)](dy, x, weight, rstd, dres, scale, dx, db, dw_part, rows, n, per,
                                   HAS_DRES=dres is not None, HAS_SCALE=scale is not None, BLOCK=block,
                                   num_warps=_warps(block))
    return dx, db, dw_part.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# Block output: h + branch * scale (scale: the fade-in of grown channels and blocks), and its backward
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _scaled_add_kernel(H, BR, S, OUT, numel, N, HAS_H: tl.constexpr, HAS_SCALE: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    b = tl.load(BR + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_SCALE:
        b = b * tl.load(S + offs % N, mask=m, other=0.0)
    if HAS_H:
        b += tl.load(H + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + offs, b.to(OUT.dtype.element_ty), mask=m)


def scaled_add(h, branch, scale, out_dtype):
    """(h if given, else 0) + branch * scale, rounded once to out_dtype. branch: [..., N]; scale: [N] or None."""
    out = torch.empty(branch.shape, dtype=out_dtype, device=branch.device)
    numel = branch.numel()
    _scaled_add_kernel[(triton.cdiv(numel, ELEMENTWISE_BLOCK),)](
        h, branch, scale, out, numel, branch.shape[-1], HAS_H=h is not None, HAS_SCALE=scale is not None,
        BLOCK=ELEMENTWISE_BLOCK, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------------
# SwiGLU: silu(gate) * up * unit_mask (the per-unit fade-in of grown hidden units, 1 when absent)
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _swiglu_fwd_kernel(G, U, M, OUT, numel, N, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    if HAS_MASK:
        h = h * tl.load(M + offs % N, mask=m, other=0.0)
    tl.store(OUT + offs, h.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(DH, G, U, M, DG, DU, numel, N, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    dh = tl.load(DH + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_MASK:
        dh = dh * tl.load(M + offs % N, mask=m, other=0.0)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=m)
    tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=m)


def swiglu_fwd(gate, up, mask):
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    numel = gate.numel()
    _swiglu_fwd_kernel[(triton.cdiv(numel, ELEMENTWISE_BLOCK),)](
        gate, up, mask, out, numel, gate.shape[-1], HAS_MASK=mask is not None, BLOCK=ELEMENTWISE_BLOCK,
        num_warps=4)
    return out


def swiglu_bwd(dh, gate, up, mask):
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    numel = gate.numel()
    _swiglu_bwd_kernel[(triton.cdiv(numel, ELEMENTWISE_BLOCK),)](
        dh, gate, up, mask, dg, du, numel, gate.shape[-1], HAS_MASK=mask is not None, BLOCK=ELEMENTWISE_BLOCK,
        num_warps=4)
    return dg, du


# ----------------------------------------------------------------------------------------------------------
# Rotary embedding of q and k in one launch ("rotate_half" layout: pairs (x[i], x[i + D/2]))
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _rope_one(X, OUT, row, cos, sin, n_heads, D, HALF, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    m = (h < n_heads) & (d < HALF)
    base = row * n_heads * D + h * D + d
    x1 = tl.load(X + base, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + HALF, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + base, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=m)
    tl.store(OUT + base + HALF, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, QO, KO, T, n_q, n_k, D, HALF, INVERSE: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per token (b, t). INVERSE rotates by -angle: the backward of a rotation is its transpose."""
    row = tl.program_id(0).to(tl.int64)
    t = row % T
    d = tl.arange(0, BLOCK_D)[None, :]
    cos = tl.load(COS + t * HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(SIN + t * HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    _rope_one(Q, QO, row, cos, sin, n_q, D, HALF, BLOCK_HQ, BLOCK_D)
    _rope_one(K, KO, row, cos, sin, n_k, D, HALF, BLOCK_HK, BLOCK_D)


def rope(q, k, cos, sin, inverse=False):
    """q: [B, T, Hq, D], k: [B, T, Hk, D] contiguous; cos, sin: [T, D/2] contiguous."""
    B, T, n_q, D = q.shape
    n_k = k.shape[2]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    block_d = triton.next_power_of_2(D // 2)
    _rope_kernel[(B * T,)](q, k, cos, sin, qo, ko, T, n_q, n_k, D, D // 2, INVERSE=inverse,
                           BLOCK_HQ=triton.next_power_of_2(n_q), BLOCK_HK=triton.next_power_of_2(n_k),
                           BLOCK_D=block_d, num_warps=_warps(block_d * triton.next_power_of_2(n_q)))
    return qo, ko


# ----------------------------------------------------------------------------------------------------------
# Cross-entropy over the vocabulary in chunks of BLOCK_V (online log-sum-exp): one program per row
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _ce_fwd_kernel(LOGITS, TGT, LOSS, LSE, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * V
    cols = tl.arange(0, BLOCK_V)
    mx = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        new_mx = tl.maximum(mx, tl.max(x, axis=0))
        s = s * tl.exp(mx - new_mx) + tl.sum(tl.exp(x - new_mx), axis=0)
        mx = new_mx
    lse = mx + tl.log(s)
    tgt = tl.load(TGT + row)
    valid = tgt != ignore_index
    x_t = tl.load(base + tgt, mask=valid, other=0.0).to(tl.float32)
    tl.store(LSE + row, lse)
    tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))


@triton.jit
def _ce_bwd_kernel(LOGITS, TGT, LSE, DLOSS, DLOGITS, V, ignore_index, dloss_scale,
                   DLOSS_PER_ROW: tl.constexpr, BLOCK_V: tl.constexpr):
    """dlogits = (softmax - onehot(target)) * dloss; rows with the ignored target get 0. DLOGITS may be
    LOGITS itself (the fused linear + CE overwrites each chunk of logits with its gradient)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    cols = tl.arange(0, BLOCK_V)
    tgt = tl.load(TGT + row)
    lse = tl.load(LSE + row)
    if DLOSS_PER_ROW:
        g = tl.load(DLOSS + row).to(tl.float32) * dloss_scale
    else:
        g = dloss_scale
    g = tl.where(tgt != ignore_index, g, 0.0)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        x = tl.load(LOGITS + base + c, mask=c < V, other=0.0).to(tl.float32)
        d = tl.exp(x - lse) - tl.where(c == tgt, 1.0, 0.0)
        tl.store(DLOGITS + base + c, (d * g).to(DLOGITS.dtype.element_ty), mask=c < V)


def _block_v(V):
    return min(triton.next_power_of_2(V), 4096 if not INTERPRET else 128)


def cross_entropy_fwd(logits, targets, ignore_index):
    """logits: [rows, V] contiguous; returns per-row loss (0 where ignored) and log-sum-exp, both fp32."""
    rows, V = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block = _block_v(V)
    _ce_fwd_kernel[(rows,)](logits, targets, loss, lse, V, ignore_index, BLOCK_V=block, num_warps=_warps(block))
    return loss, lse


def cross_entropy_bwd(logits, targets, lse, dloss, ignore_index, scale=1.0, out=None):
    """dloss: [rows] per-row gradients, or None for a uniform ``scale``. ``out`` may alias ``logits``."""
    rows, V = logits.shape
    out = torch.empty_like(logits) if out is None else out
    block = _block_v(V)
    _ce_bwd_kernel[(rows,)](logits, targets, lse, dloss, out, V, ignore_index, float(scale),
                            DLOSS_PER_ROW=dloss is not None, BLOCK_V=block, num_warps=_warps(block))
    return out
