"""Width growth operators for the three widths of the decoder: the MLP hidden size ``d_ff``, the attention heads
(``n_head`` query heads in ``n_kv_head`` key/value groups, head_dim fixed) and the residual stream ``d_model``.

A width operator is a composition of up to three one-axis steps (heads, then d_ff, then d_model), each a
GrowthPlan; ``compose`` makes one plan of them. The steps are shared; what differs between methods is one
``WidthMethod`` record each (``METHODS``). Per axis a unit is a head / hidden unit / residual channel. Its
*fan-in* weights produce it (wq/wk/wv rows, w_gate/w_up rows; for a residual channel the writers: embedding
column, wo and w_down rows) and its *fan-out* weights consume it (wo columns, w_down columns; for a residual
channel the readers: wq/wk/wv/w_gate/w_up columns and the LM head column).

Methods (every one works with GQA on or off and with tied or untied embeddings):

* ``zero``: function-preserving. New fan-out weights zero, new fan-in weights random. For d_model the new
  channels' WRITERS are zero instead (so the new residual channels are exactly zero at the growth step) and the
  readers random.
* ``net2net`` (Chen et al. 2016): new units duplicate old ones (cyclically: new unit u copies old unit u mod C),
  fan-out weights of every copy divided by the copy count: exact. Optional ``noise``: a +e/-e pair added to a
  copy's and its original's fan-out weights, which keeps the sum. d_model only by an integer factor (every channel
  tiled g times, so RMSNorm's mean square is unchanged): duplicating a subset of channels would change it.
* ``vt`` (Variance Transfer, Yuan et al. 2023, section 3.1): new units come in +W/-W pairs: both
  twins get the same fan-in draw (variance 1/C^2, C the old width) so they compute the same activation, and
  opposite fan-out draws (variance 1/(C+k)^2, k added) so they cancel; both still get (opposite) gradients. Old
  fan-out weights are rescaled by C/(C+k) (its Table 1); our model has no forward multiplier to absorb that, so
  the producer of the old units is scaled by (C+k)/C to compensate exactly (see ``_rescale_*`` comments).
  d_model deviates: RMSNorm couples all channels, so any non-zero new channel would change every normalised
  activation; the writers of new channels are zero and only the readers are +W/-W pairs.
* ``msg`` (Masked Structural Growth, Yao et al. 2024): new units random, multiplied by a mask that is 0 at the
  growth step and ramps to 1 over ``fade_steps``: exact at the growth step whatever the new weights.

Widening d_model with zero channels (zero, vt, msg) changes RMSNorm's mean square by d_old/d_new: every RMSNorm
gain is scaled by sqrt(d_old/d_new), and, since eps sits inside the square root,
``norm_eps`` is scaled by d_old/d_new too (``scale_eps=True``): rsqrt(r*ms + r*eps) * sqrt(r) * g =
rsqrt(ms + eps) * g exactly. Without it the function changes by O(eps / mean(h^2)), which is ~1e-2 relative for
a freshly initialised residual stream. The grown model's config therefore carries the rescaled ``norm_eps``
(``plan.new_cfg``); the user's ``new_cfg.norm_eps`` is ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import reduce
from typing import Callable

import torch

from nanogrow.grow.compose import compose
from nanogrow.grow.plan import STATE_POLICIES, Fresh, GrowthPlan, ParamPlan, Piece, identity_targets
from nanogrow.grow.schema import check_growth, derive_seed, param_shapes
from nanogrow.model import ModelConfig

Draw = tuple[str, float, float] | None  # (init, std, value) of new units' weights; None: no fresh units


@dataclass(frozen=True)
class WidthMethod:
    """What one width method does with new units, in one place; the axis steps below are shared by all methods.
    A new width operator is one record here, one operator function (its options) and a registry line.

    fan_in(C, std) / fan_out(C2, std): the draw of the new units' producing / consuming weights (C, C2: old and new
    width of the axis; std: the default init std of that weight). writer(std): d_model only, the draw of the new
    residual channels' writers (embedding column, wo and w_down rows). copies: new units copy old ones and the
    fan-out of every copy is divided by the copy count (Net2Net; d_model by an integer factor, channels tiled);
    twins: new units come in +W/-W pairs sharing one draw and the old fan-out is rescaled (VT); masks: new units
    fade in through the model's mask buffers (MSG)."""

    name: str
    fan_in: Callable[[int, float], Draw]
    fan_out: Callable[[int, float], Draw]
    writer: Callable[[float], Draw]
    copies: bool = False
    twins: bool = False
    masks: bool = False


def _none(*_) -> Draw:
    return None


def _normal(_c: int, std: float) -> Draw:
    return ("normal", std, 0.0)


def _zeros(*_) -> Draw:
    return ("zeros", 0.0, 0.0)


METHODS = {
    # function-preserving: new fan-out zero (d_model: new writers zero), fan-in random
    "zero": WidthMethod("zero", fan_in=_normal, fan_out=_zeros, writer=_zeros),
    # Net2Net: copies, fan-out divided by the copy count
    "net2net": WidthMethod("net2net", fan_in=_none, fan_out=_none, writer=_none, copies=True),
    # VT: fan-in variance 1/C^2 (twins share the draw), fan-out 1/(C+k)^2 (twins opposite: outputs cancel)
    "vt": WidthMethod("vt", fan_in=lambda c, _std: ("normal", 1.0 / c, 0.0),
                      fan_out=lambda c2, _std: ("normal", 1.0 / c2, 0.0), writer=_zeros, twins=True),
    # MSG: new units random everywhere, masked to 0 at the growth step
    "msg": WidthMethod("msg", fan_in=_normal, fan_out=_normal, writer=lambda std: ("normal", std, 0.0), masks=True),
}


def width_method(method: str | WidthMethod) -> WidthMethod:
    if isinstance(method, WidthMethod):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown width method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method]


# ----------------------------------------------------------------------------------------------------------
# Unit maps
# ----------------------------------------------------------------------------------------------------------

def _ar(*args) -> torch.Tensor:
    return torch.arange(*args, dtype=torch.long)


@dataclass
class UnitMap:
    """How one axis grows n_old -> n_new units. Positions ``dst_old`` carry old units ``src_old`` (an old unit
    may be carried more than once: Net2Net). ``fresh_a`` are new positions; when ``fresh_b`` is not empty,
    (fresh_a[i], fresh_b[i]) are +W/-W twins sharing one draw."""

    n_old: int
    n_new: int
    dst_old: torch.Tensor
    src_old: torch.Tensor
    fresh_a: torch.Tensor
    fresh_b: torch.Tensor

    @property
    def fresh(self) -> torch.Tensor:
        return torch.cat([self.fresh_a, self.fresh_b])

    def counts(self) -> torch.Tensor:
        """For each gathered position: how many positions carry the same old unit (float64)."""
        c = torch.bincount(self.src_old, minlength=self.n_old).to(torch.float64)
        return c[self.src_old]

    def duplicates(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Net2Net noise pairs, grouped so no group repeats a position: [(copy positions, original positions)]."""
        first: dict[int, int] = {}
        rank: dict[int, int] = {}
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for p, u in zip(self.dst_old.tolist(), self.src_old.tolist()):
            if u not in first:
                first[u] = p
                continue
            r = rank.get(u, 0)
            rank[u] = r + 1
            groups.setdefault(r, ([], []))
            groups[r][0].append(p), groups[r][1].append(first[u])
        return [(torch.tensor(a), torch.tensor(b)) for a, b in groups.values()]

    def expand(self, width: int) -> "UnitMap":
        """Unit u -> elements u*width .. u*width+width-1 (heads -> rows of head_dim)."""
        def e(ix):
            return (ix[:, None] * width + _ar(width)[None, :]).reshape(-1)
        return UnitMap(self.n_old * width, self.n_new * width, e(self.dst_old), e(self.src_old), e(self.fresh_a),
                       e(self.fresh_b))


def check_tiling_factor(D: int, D2: int) -> None:
    """Net2Net-style d_model maps (net2net, and the learned operator's initial maps) are function-preserving only
    for an integer factor; both operators refuse the rest with this one message."""
    if D2 % D:
        raise ValueError(
            f"net2net widens d_model only by an integer factor (d_model {D} -> {D2}): every residual channel is "
            "tiled g times so RMSNorm's mean square is unchanged; duplicating only some channels would change "
            "every normalised activation. Use zero, vt or msg, or grow d_model to a multiple")


def plain_map(C: int, C2: int, method: str | WidthMethod, what: str) -> UnitMap:
    """Old units first, new ones appended."""
    k = C2 - C
    m = width_method(method)
    if m.copies:
        return UnitMap(C, C2, _ar(C2), _ar(C2) % C, _ar(0), _ar(0))
    if m.twins:
        if k % 2:
            raise ValueError(f"vt adds units in +W/-W pairs: {what} must grow by an even number ({C} -> {C2})")
        h = k // 2
        return UnitMap(C, C2, _ar(C), _ar(C), _ar(C, C + h), _ar(C + h, C2))
    return UnitMap(C, C2, _ar(C), _ar(C), _ar(C, C2), _ar(0))


def head_maps(H: int, K: int, H2: int, K2: int, method: str | WidthMethod) -> tuple[UnitMap, UnitMap]:
    """Query-head and kv-head maps for (n_head, n_kv_head) (H, K) -> (H2, K2), GQA layout respected: query head
    h uses kv head h // (H/K) (SDPA's enable_gqa and flash-attn repeat kv heads in that order), so old head
    (group j, slot s) moves to j*g2 + s, new query heads fill the remaining slots of old groups (sharing their
    key/value) and new kv groups are appended."""
    g, g2 = H // K, H2 // K2
    m = width_method(method)
    old_pos = torch.tensor([j * g2 + s for j in range(K) for s in range(g)], dtype=torch.long)
    if m.copies:
        # New head (j2, s2) copies old head (j2 mod K, s2 mod g); a new kv group copies kv group j2 mod K, so a
        # copied head sees the same keys/values as its original and computes the same output.
        src = torch.tensor([(j2 % K) * g + (s2 % g) for j2 in range(K2) for s2 in range(g2)], dtype=torch.long)
        return (UnitMap(H, H2, _ar(H2), src, _ar(0), _ar(0)), UnitMap(K, K2, _ar(K2), _ar(K2) % K, _ar(0), _ar(0)))
    in_old = [j * g2 + s for j in range(K) for s in range(g, g2)]
    in_new = [j * g2 + s for j in range(K, K2) for s in range(g2)]
    kv_a, kv_b = _ar(K, K2), _ar(0)
    if not m.twins:
        qa, qb = torch.tensor(in_old + in_new, dtype=torch.long), _ar(0)
        return UnitMap(H, H2, old_pos, _ar(H), qa.sort().values, qb), UnitMap(K, K2, _ar(K), _ar(K), kv_a, kv_b)
    # vt: twins must compute the same head output, so they share a kv head (pairs inside a group), or sit in two
    # new groups whose kv heads are twins too.
    e, m_new = g2 - g, K2 - K
    if e % 2:
        raise ValueError(f"vt adds query heads in +W/-W pairs that share a kv group: each of the {K} old kv groups "
                         f"gets {e} new query heads ({g} -> {g2} per group), which must be even")
    qa = [j * g2 + g + s for j in range(K) for s in range(e // 2)]
    qb = [j * g2 + g + e // 2 + s for j in range(K) for s in range(e // 2)]
    if m_new:
        if g2 % 2 == 0:
            qa += [j * g2 + s for j in range(K, K2) for s in range(g2 // 2)]
            qb += [j * g2 + g2 // 2 + s for j in range(K, K2) for s in range(g2 // 2)]
        elif m_new % 2 == 0:
            qa += [(K + i) * g2 + s for i in range(m_new // 2) for s in range(g2)]
            qb += [(K + m_new // 2 + i) * g2 + s for i in range(m_new // 2) for s in range(g2)]
            kv_a, kv_b = _ar(K, K + m_new // 2), _ar(K + m_new // 2, K2)
        else:
            raise ValueError(f"vt adds query heads in +W/-W pairs: {m_new} new kv groups of {g2} query heads each "
                             "cannot be paired (need an even group size or an even number of new groups)")
    q = UnitMap(H, H2, old_pos, _ar(H), torch.tensor(qa, dtype=torch.long), torch.tensor(qb, dtype=torch.long))
    return q, UnitMap(K, K2, _ar(K), _ar(K), kv_a, kv_b)


# ----------------------------------------------------------------------------------------------------------
# Building pieces for one parameter along one dimension
# ----------------------------------------------------------------------------------------------------------

def _along(dim: int, n: int, ix):
    return tuple(ix if d == dim else None for d in range(n))


def _with(shape, dim, size):
    s = list(shape)
    s[dim] = size
    return tuple(s)


class _Ctx:
    """What every axis step needs: the method's record, seed, options, new config."""

    def __init__(self, method: WidthMethod, seed, n: ModelConfig, state: str, noise: float = 0.0,
                 rescale: bool = True):
        self.m, self.seed, self.n, self.state, self.noise, self.rescale = method, seed, n, state, noise, rescale
        self.method = method.name
        self.out_std = n.init_std / math.sqrt(2 * max(1, n.n_layer))

    @property
    def vt_rescale(self) -> bool:
        """Old fan-out rescaled by C/C2 (VT's Table 1), with an exact compensation upstream."""
        return self.m.twins and self.rescale

    def fresh(self, name: str, tag: str, shape, init: str, std: float = 0.0, value: float = 0.0) -> Fresh:
        seed = derive_seed(self.seed, self.method, name, tag) if init == "normal" else 0
        return Fresh(tuple(shape), init, std=std, value=value, seed=seed, state=self.state, like=name)


def _grow(ctx: _Ctx, name: str, shape, dim: int, um: UnitMap, scale: torch.Tensor | None, new: tuple | None,
          twin_sign: float = 1.0, split: bool = False) -> ParamPlan:
    """One parameter growing along ``dim``: gathered positions (times ``scale``, aligned with um.dst_old) plus
    the fresh ones: ``new`` = (init, std, value) of their draw, or None when the map has no fresh positions.
    Twins (fresh_b) read the same draw times ``twin_sign``. ``split``: these are the fan-out weights Net2Net
    divides among copies (where its optional noise goes)."""
    n = len(shape)
    pieces = [Piece(name, _along(dim, n, um.dst_old), _along(dim, n, um.src_old), 1.0, _along(dim, n, scale))]
    if len(um.fresh_a):
        init, std, value = new
        h = len(um.fresh_a)
        f = ctx.fresh(name, f"dim{dim}", _with(shape, dim, h), init, std, value)
        pieces.append(Piece(f, _along(dim, n, um.fresh_a), _along(dim, n, _ar(h))))
        if len(um.fresh_b):
            pieces.append(Piece(f, _along(dim, n, um.fresh_b), _along(dim, n, _ar(h)), twin_sign))
    if split and ctx.noise > 0:
        # Symmetry breaking that keeps the sum: +e on a copy's fan-out weights, -e on its original's.
        for r, (cp, orig) in enumerate(um.duplicates()):
            f = ctx.fresh(name, f"noise{r}", _with(shape, dim, len(cp)), "normal", ctx.noise)
            pieces.append(Piece(f, _along(dim, n, cp), _along(dim, n, _ar(len(cp))), 1.0, add=True))
            pieces.append(Piece(f, _along(dim, n, orig), _along(dim, n, _ar(len(cp))), -1.0, add=True))
    return ParamPlan(name, tuple(shape), pieces)


def _fan_in(ctx: _Ctx, name, shape, dim, um: UnitMap, C: int, scale=None, std=None) -> ParamPlan:
    """Weights that produce the axis' units (new units' incoming weights); twins share the draw (same sign)."""
    new = ctx.m.fan_in(C, ctx.n.init_std if std is None else std)
    return _grow(ctx, name, shape, dim, um, scale, new, twin_sign=1.0)


def _fan_out(ctx: _Ctx, name, shape, dim, um: UnitMap, C2: int, scale=None, std=None) -> ParamPlan:
    """Weights that consume the axis' units (new units' outgoing weights); twins get opposite signs (their
    outputs cancel); copies divide the fan-out among themselves."""
    new = ctx.m.fan_out(C2, ctx.n.init_std if std is None else std)
    if ctx.m.copies:
        scale = um.counts().reciprocal() if scale is None else scale * um.counts().reciprocal()
    return _grow(ctx, name, shape, dim, um, scale, new, twin_sign=-1.0, split=ctx.m.copies)


# ----------------------------------------------------------------------------------------------------------
# Axis steps
# ----------------------------------------------------------------------------------------------------------

def _step_plan(ctx, cur, nxt, targets, masks, fade_steps, name) -> GrowthPlan:
    return GrowthPlan(f"{ctx.method}:{name}", {}, cur, nxt, ctx.seed, targets, masks, fade_steps)


def _heads_step(ctx: _Ctx, cur: ModelConfig, nxt: ModelConfig, fade_steps: int) -> GrowthPlan:
    H, K, H2, K2, hd = cur.n_head, cur.n_kv_head, nxt.n_head, nxt.n_kv_head, cur.head_dim
    qh, kvh = head_maps(H, K, H2, K2, ctx.m)
    q, kv = qh.expand(hd), kvh.expand(hd)
    C, C2 = H * hd, H2 * hd
    shapes = param_shapes(nxt)
    targets = identity_targets(nxt)
    # VT rescale: old wo columns (fan-out of old heads) times r = C/C2 (Table 1); compensated by the old value
    # rows times 1/r: a head's output is linear in v, so wo[:, h] * r @ (attn @ v / r) is unchanged. New query
    # heads inside old groups see the scaled v too, but their twins' wo columns cancel.
    r = C / C2
    vt_scale = ctx.vt_rescale and C2 != C
    for i in range(nxt.n_layer):
        p = f"layers.{i}.attn."
        targets[p + "wq.weight"] = _fan_in(ctx, p + "wq.weight", shapes[p + "wq.weight"], 0, q, C)
        targets[p + "wk.weight"] = _fan_in(ctx, p + "wk.weight", shapes[p + "wk.weight"], 0, kv, C)
        v_scale = torch.full((len(kv.dst_old),), 1.0 / r, dtype=torch.float64) if vt_scale else None
        targets[p + "wv.weight"] = _fan_in(ctx, p + "wv.weight", shapes[p + "wv.weight"], 0, kv, C, scale=v_scale)
        o_scale = torch.full((len(q.dst_old),), r, dtype=torch.float64) if vt_scale else None
        targets[p + "wo.weight"] = _fan_out(ctx, p + "wo.weight", shapes[p + "wo.weight"], 1, q, C2, scale=o_scale,
                                            std=ctx.out_std)
    masks = {}
    if ctx.m.masks and len(qh.fresh):
        fading = torch.zeros(H2, dtype=torch.bool)
        fading[qh.fresh] = True
        masks = {f"layers.{i}.attn.head_mask": fading.clone() for i in range(nxt.n_layer)}
    return _step_plan(ctx, cur, nxt, targets, masks, fade_steps, "heads")


def _dff_step(ctx: _Ctx, cur: ModelConfig, nxt: ModelConfig, fade_steps: int) -> GrowthPlan:
    C, C2 = cur.d_ff, nxt.d_ff
    um = plain_map(C, C2, ctx.m, "d_ff")
    shapes = param_shapes(nxt)
    targets = identity_targets(nxt)
    # VT rescale: old w_down columns times r = C/C2, compensated by old w_up rows times 1/r: SwiGLU's
    # silu(gate) * up is linear in up, so the hidden unit scales by 1/r and w_down[:, u] * r undoes it.
    r = C / C2
    vt_scale = ctx.vt_rescale and C2 != C
    n_old = len(um.dst_old)
    for i in range(nxt.n_layer):
        p = f"layers.{i}.mlp."
        targets[p + "w_gate.weight"] = _fan_in(ctx, p + "w_gate.weight", shapes[p + "w_gate.weight"], 0, um, C)
        up_scale = torch.full((n_old,), 1.0 / r, dtype=torch.float64) if vt_scale else None
        targets[p + "w_up.weight"] = _fan_in(ctx, p + "w_up.weight", shapes[p + "w_up.weight"], 0, um, C,
                                             scale=up_scale)
        down_scale = torch.full((n_old,), r, dtype=torch.float64) if vt_scale else None
        targets[p + "w_down.weight"] = _fan_out(ctx, p + "w_down.weight", shapes[p + "w_down.weight"], 1, um, C2,
                                                scale=down_scale, std=ctx.out_std)
    masks = {}
    if ctx.m.masks and len(um.fresh):
        fading = torch.zeros(C2, dtype=torch.bool)
        fading[um.fresh] = True
        masks = {f"layers.{i}.mlp.unit_mask": fading.clone() for i in range(nxt.n_layer)}
    return _step_plan(ctx, cur, nxt, targets, masks, fade_steps, "d_ff")


def _dmodel_step(ctx: _Ctx, cur: ModelConfig, nxt: ModelConfig, fade_steps: int, scale_eps: bool) -> GrowthPlan:
    D, D2 = cur.d_model, nxt.d_model
    m = ctx.m
    if m.copies:
        check_tiling_factor(D, D2)
    um = plain_map(D, D2, m, "d_model")
    tied = nxt.tie_embeddings
    targets = identity_targets(nxt)
    shapes = param_shapes(nxt)
    n_old = len(um.dst_old)
    notes = []

    # --- RMSNorm gains (and eps, returned in the new config) ------------------------------------------------
    if m.copies:
        g = D2 // D
        gain = 1.0  # tiling keeps mean(h^2); gains are tiled with their channels
        eps = cur.norm_eps
    else:
        # New residual channels are exactly zero at the growth step, so mean(h^2) shrinks by r = D/D2:
        # gains * sqrt(r) and eps * r make rsqrt(r*ms + r*eps) * sqrt(r) = rsqrt(ms + eps).
        gain = math.sqrt(D / D2)
        eps = cur.norm_eps * (D / D2) if scale_eps else cur.norm_eps
        if not scale_eps:
            notes.append("scale_eps=False: norm_eps kept, so the function changes by O(eps / mean(h^2))")
    r = D / D2
    vt_scale = ctx.vt_rescale and D2 != D
    # VT rescale of the readers (fan-out of residual channels): old columns times r, compensated by the RMSNorm
    # gain right before them times 1/r (the readers only see gain * normalised h). The tied LM head is also the
    # embedding (a writer), so with tied embeddings the final norm and the head are left unscaled.
    block_gain = gain / r if vt_scale else gain
    final_gain = gain / r if (vt_scale and not tied) else gain
    if m.copies and tied:
        # The tied LM head reads the tiled channels with tiled (undivided) weights: logits would be g times too
        # large, so the final norm's gain (read only by the head) is divided by g instead.
        final_gain = 1.0 / g
    reader_scale = torch.full((n_old,), r, dtype=torch.float64) if vt_scale else None

    def gain_plan(name, value):
        sc = None if value == 1.0 else torch.full((n_old,), value, dtype=torch.float64)
        new = ("const", 0.0, value)
        return _grow(ctx, name, shapes[name], 0, um, sc, new if len(um.fresh_a) else None, twin_sign=1.0)

    def writer(name, std):
        # Writers of residual channels: zero for the function-preserving methods (RMSNorm couples channels, so a
        # non-zero new channel changes every normalised activation), masked random (msg), tiled copies (net2net).
        return _grow(ctx, name, shapes[name], dim_w[name], um, None, m.writer(std), twin_sign=1.0)

    def reader(name, scale=reader_scale):
        return _fan_out(ctx, name, shapes[name], 1, um, D2, scale=scale)

    dim_w = {"tok_emb.weight": 1}
    targets["tok_emb.weight"] = writer("tok_emb.weight", ctx.n.init_std)
    for i in range(nxt.n_layer):
        p = f"layers.{i}."
        dim_w[p + "attn.wo.weight"] = 0
        dim_w[p + "mlp.w_down.weight"] = 0
        targets[p + "attn_norm.weight"] = gain_plan(p + "attn_norm.weight", block_gain)
        targets[p + "mlp_norm.weight"] = gain_plan(p + "mlp_norm.weight", block_gain)
        for s in ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "mlp.w_gate.weight", "mlp.w_up.weight"):
            targets[p + s] = reader(p + s)
        targets[p + "attn.wo.weight"] = writer(p + "attn.wo.weight", ctx.out_std)
        targets[p + "mlp.w_down.weight"] = writer(p + "mlp.w_down.weight", ctx.out_std)
    targets["norm.weight"] = gain_plan("norm.weight", final_gain)
    if not tied:
        targets["lm_head.weight"] = reader("lm_head.weight")
    targets = {k: targets[k] for k in param_shapes(nxt)}
    masks = {}
    if m.masks and len(um.fresh):
        fading = torch.zeros(D2, dtype=torch.bool)
        fading[um.fresh] = True
        masks = {"resid_mask": fading}
    nxt = replace(nxt, norm_eps=eps)
    plan = _step_plan(ctx, cur, nxt, targets, masks, fade_steps, "d_model")
    plan.notes.extend(notes)
    return plan


# ----------------------------------------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------------------------------------

def _width(method: str | WidthMethod, old: ModelConfig, new: ModelConfig, seed: int, options: dict, *,
           state: str = "zero", noise: float = 0.0, rescale: bool = True, fade_steps: int = 0,
           scale_eps: bool = True) -> GrowthPlan:
    if state not in STATE_POLICIES:
        raise ValueError(f"state must be one of {STATE_POLICIES}, got {state!r}")
    if not isinstance(fade_steps, int) or isinstance(fade_steps, bool) or fade_steps < 0:
        raise ValueError(f"fade_steps must be a non-negative integer, got {fade_steps!r}")
    wm = width_method(method)
    method = wm.name
    if wm.masks and fade_steps < 1:
        raise ValueError(f"{method} needs fade_steps >= 1 (the mask ramp length)")
    if not (isinstance(noise, (int, float)) and noise >= 0):
        raise ValueError(f"noise must be a non-negative number, got {noise!r}")
    o, n = check_growth(old, new)
    if n.n_layer != o.n_layer:
        raise ValueError(f"{method} grows width only, but n_layer changes {o.n_layer} -> {n.n_layer}: use "
                         f"op='joint' with width_op='{method}' and a depth_op")
    # Steps at explicit head_dim/d_ff so the intermediate configs validate; fresh init stds use the new init_std.
    cur = o
    start = replace(o, init_std=n.init_std)
    ctx = _Ctx(wm, seed, n, state, noise=float(noise), rescale=rescale)
    steps: list[GrowthPlan] = []
    if (n.n_head, n.n_kv_head) != (o.n_head, o.n_kv_head):
        nxt = replace(start, n_head=n.n_head, n_kv_head=n.n_kv_head)
        steps.append(_heads_step(ctx, cur, nxt, fade_steps))
        cur = start = nxt
    if n.d_ff != o.d_ff:
        nxt = replace(start, d_ff=n.d_ff)
        steps.append(_dff_step(ctx, cur, nxt, fade_steps))
        cur = start = nxt
    if n.d_model != o.d_model:
        nxt = replace(start, d_model=n.d_model)
        steps.append(_dmodel_step(ctx, cur, nxt, fade_steps, scale_eps))
        cur = steps[-1].new_cfg
    final = replace(n, norm_eps=cur.norm_eps)
    if not steps:
        return GrowthPlan(method, options, o, final, seed, identity_targets(final), {}, fade_steps)
    plan = reduce(compose, steps)
    notes = [s for p in steps for s in p.notes]
    return GrowthPlan(method, options, o, final, seed, plan.targets, plan.masks,
                      fade_steps if plan.masks else 0, notes=notes)


def zero(old: ModelConfig, new: ModelConfig, seed: int = 0, *, state: str = "zero",
         scale_eps: bool = True) -> GrowthPlan:
    """Function-preserving width growth with zero-initialised fan-out (d_model: zero writers, so new residual
    channels are exactly zero; RMSNorm gains and eps rescaled). New fan-in weights ~ N(0, init_std)."""
    return _width("zero", old, new, seed, {"state": state, "scale_eps": scale_eps}, state=state, scale_eps=scale_eps)


def net2net(old: ModelConfig, new: ModelConfig, seed: int = 0, *, noise: float = 0.0) -> GrowthPlan:
    """Net2WiderNet: new units copy old ones (u copies u mod C), fan-out divided by the copy count; exact for
    d_ff and heads (GQA: a copied head's kv group is copied with it); d_model only by an integer factor."""
    return _width("net2net", old, new, seed, {"noise": noise}, noise=noise)


def vt(old: ModelConfig, new: ModelConfig, seed: int = 0, *, rescale: bool = True, state: str = "zero",
       scale_eps: bool = True) -> GrowthPlan:
    """Variance Transfer (Yuan et al. 2023): +W/-W twins, fan-in var 1/C^2, fan-out var 1/(C+k)^2, old fan-out
    rescaled by C/(C+k) with an exact compensation (``rescale``); function-preserving."""
    return _width("vt", old, new, seed, {"rescale": rescale, "state": state, "scale_eps": scale_eps},
                  state=state, rescale=rescale, scale_eps=scale_eps)


def msg(old: ModelConfig, new: ModelConfig, seed: int = 0, *, fade_steps: int = 1000, state: str = "zero",
        scale_eps: bool = True) -> GrowthPlan:
    """Masked Structural Growth (Yao et al. 2024): new units random and masked (head_mask / unit_mask /
    resid_mask = 0 at the growth step, ramping to 1 over ``fade_steps``)."""
    return _width("msg", old, new, seed, {"fade_steps": fade_steps, "state": state, "scale_eps": scale_eps},
                  state=state, fade_steps=fade_steps, scale_eps=scale_eps)


OPERATORS = {"zero": zero, "net2net": net2net, "vt": vt, "msg": msg}
