"""Depth growth operators: each one builds a GrowthPlan that says, for every layer of the grown model, which old
layer it copies, or that it is new (random, or an identity block).

Every operator here accepts ``fade_steps`` (> 0: each new block fades in through the model's ``block_mask``,
out = m * block(h) + (1 - m) * h with m ramping 0 -> 1, which makes ANY depth operator function-preserving at the
growth step) and ``state`` (optimizer moments of fresh weights: ``zero`` or ``mean-of-source``, the mean over
the same parameter of the nearest old layer). A layer is "new" if it is random or an identity block, or if it
copies an old layer that an earlier target layer already copies (the first copy is the original).
"""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import product

import torch

from nanogrow.grow.plan import STATE_POLICIES, Fresh, GrowthPlan, ParamPlan, Piece, copy_piece
from nanogrow.grow.schema import check_growth, derive_seed, param_shapes
from nanogrow.model import ModelConfig

# What a target layer is made of: (kind, j, near). ("copy", j, _) copies old layer j; ("random", None, near) is a
# fresh random layer; ("identity", j, near) is a block whose output projections (wo, w_down) are zero and whose
# other weights copy old layer j, or are random when j is None. ``near`` is the old layer whose moments the
# "mean-of-source" state policy borrows for fresh weights.
LayerSpec = tuple[str, int | None, int]


def _depth_only(op: str, old: ModelConfig, new: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    o, n = check_growth(old, new)
    for k in ("d_model", "n_head", "n_kv_head", "head_dim", "d_ff"):
        if getattr(o, k) != getattr(n, k):
            raise ValueError(
                f"{op} grows depth only (n_layer), but {k} changes {getattr(o, k)} -> {getattr(n, k)}: use "
                f"op='joint' with depth_op='{op}' and a width_op")
    if o.n_layer == 0 and op != "identity":
        raise ValueError(f"{op}: the model has 0 layers, so there is no layer to copy; grow it with op 'identity' "
                         f"(new blocks with zero output projections: the function is kept)")
    # Depth growth never touches RMSNorm, so the grown model keeps the old epsilon (see width.py for why a
    # d_model growth rescales it).
    return o, replace(n, norm_eps=o.norm_eps)


def _check_common(fade_steps, state):
    if not isinstance(fade_steps, int) or isinstance(fade_steps, bool) or fade_steps < 0:
        raise ValueError(f"fade_steps must be a non-negative integer, got {fade_steps!r}")
    if state not in STATE_POLICIES:
        raise ValueError(f"state must be one of {STATE_POLICIES}, got {state!r}")


def layer_plan(op: str, o: ModelConfig, n: ModelConfig, specs: list[LayerSpec], seed: int, options: dict,
               fade_steps: int = 0, state: str = "zero") -> GrowthPlan:
    """The plan for a depth growth given one LayerSpec per target layer (shared by all depth operators)."""
    if len(specs) != n.n_layer:
        raise ValueError(f"{op}: {len(specs)} layer specs for n_layer={n.n_layer}")
    shapes = param_shapes(n)
    out_std = n.init_std / math.sqrt(2 * n.n_layer)  # as Transformer.init_weights (GPT-2 residual scaling)
    targets: dict[str, ParamPlan] = {}
    seen: set[int] = set()
    new_layers: list[int] = []
    for i, (kind, j, _) in enumerate(specs):
        if kind == "copy":
            if j in seen:
                new_layers.append(i)
            seen.add(j)
        else:
            new_layers.append(i)
    for name, shape in shapes.items():
        if not name.startswith("layers."):
            targets[name] = ParamPlan(name, shape, [copy_piece(name, len(shape))])
            continue
        i, suffix = name.split(".", 2)[1:]
        kind, j, near = specs[int(i)]
        if kind == "copy" or (kind == "identity" and j is not None and suffix not in (
                "attn.wo.weight", "mlp.w_down.weight")):
            targets[name] = ParamPlan(name, shape, [copy_piece(f"layers.{j}.{suffix}", len(shape))])
            continue
        like = f"layers.{near}.{suffix}"
        if suffix.endswith("norm.weight"):
            f = Fresh(shape, "const", value=1.0, state=state, like=like)
        elif suffix in ("attn.wo.weight", "mlp.w_down.weight"):
            # Identity block: zero output projections make the block an identity of the pre-norm residual
            # stream while it still gets gradients.
            f = Fresh(shape, "zeros", state=state, like=like) if kind == "identity" else Fresh(
                shape, "normal", std=out_std, seed=derive_seed(seed, op, name), state=state, like=like)
        else:
            f = Fresh(shape, "normal", std=n.init_std, seed=derive_seed(seed, op, name), state=state, like=like)
        targets[name] = ParamPlan(name, shape, [Piece(f, (None,) * len(shape), (None,) * len(shape))])
    masks = {f"layers.{i}.block_mask": torch.tensor(True) for i in new_layers} if fade_steps > 0 else {}
    notes = [f"new layers (target indices): {new_layers}"] if new_layers else []
    return GrowthPlan(op, options, o, n, seed, targets, masks, fade_steps, notes=notes)


def _nearest_old(specs_src: list[int | None], i: int) -> int | None:
    for d in range(len(specs_src)):
        for k in (i - d, i + d):
            if 0 <= k < len(specs_src) and specs_src[k] is not None:
                return specs_src[k]
    return None


def _order_specs(order: list[int | None]) -> list[LayerSpec]:
    specs: list[LayerSpec] = []
    for i, j in enumerate(order):
        near = _nearest_old(order, i)
        specs.append(("copy", j, j) if j is not None else ("random", None, 0 if near is None else near))
    return specs


def stack(old: ModelConfig, new: ModelConfig, seed: int = 0, *, order: list[int | None] | None = None,
          fade_steps: int = 0, state: str = "zero") -> GrowthPlan:
    """G_stack (Du et al. 2024): target layer i copies old layer ``i mod L`` (the model repeated; a partial last
    repeat when L' is not a multiple of L), or the explicit ``order``: target layer i copies old layer
    ``order[i]`` (0-indexed), None or -1 meaning a fresh random layer (normal init as ``init_weights``)."""
    _check_common(fade_steps, state)
    o, n = _depth_only("stack", old, new)
    L, L2 = o.n_layer, n.n_layer
    if order is None:
        src = [i % L for i in range(L2)]
    else:
        if not isinstance(order, (list, tuple)) or len(order) != L2:
            raise ValueError(f"stack: order must be a list of n_layer={L2} old-layer indices, got {order!r}")
        src = []
        for x in order:
            if x is None or x == -1:
                src.append(None)
            elif isinstance(x, int) and not isinstance(x, bool) and 0 <= x < L:
                src.append(x)
            else:
                raise ValueError(f"stack: order entries must be old layer indices in [0, {L}) or None/-1, got {x!r}")
    opts = {"order": order, "fade_steps": fade_steps, "state": state}
    return layer_plan("stack", o, n, _order_specs(src), seed, opts, fade_steps, state)


def interleave(old: ModelConfig, new: ModelConfig, seed: int = 0, *, fade_steps: int = 0,
               state: str = "zero") -> GrowthPlan:
    """Each old layer followed by its copy: 0 0' 1 1' ... for L' = 2L; generally each layer repeated g times
    for L' = g * L. Other depths are rejected: use ``lag`` with block=1 to interleave only some layers."""
    _check_common(fade_steps, state)
    o, n = _depth_only("interleave", old, new)
    L, L2 = o.n_layer, n.n_layer
    if L2 % L != 0:
        raise ValueError(f"interleave needs n_layer to grow by an integer factor (old {L}, new {L2}); for "
                         f"{L2 - L} interleaved copies use op='lag' with block=1")
    g = L2 // L
    return layer_plan("interleave", o, n, _order_specs([i // g for i in range(L2)]), seed,
                      {"fade_steps": fade_steps, "state": state}, fade_steps, state)


def lag_order(L: int, L_new: int, start: int, block: int, init: str = "copy") -> list[int | None]:
    """The LAG design space (Karp et al., "Landscape-Aware Growing", section 2.1), 0-indexed old layer per new
    layer, None for a random layer.

    Grow L -> L' = L + D layers (1 <= D <= L): take the D consecutive old layers starting at ``start``
    (1-indexed, start in {1, ..., L - D + 1}), cut them into D / b blocks of ``block`` = b consecutive layers
    (b divides D), and right after each block insert its new copy: with ``init='copy'`` the new layers
    duplicate that block's layers, with ``init='random'`` they are freshly initialised. b = 1 interleaves new and
    old layers; b = D puts the D new layers right after the D chosen old ones. The paper's example, 6 -> 9
    (1-indexed, new layers primed): start=1, b=1, copy: 1 1' 2 2' 3 3' 4 5 6; start=4, b=3, copy:
    1 2 3 4 5 6 4' 5' 6'; start=2, b=1, random: 1 2 r 3 r 4 r 5 6; start=3, b=3, random: 1 2 3 4 5 r r r 6.
    """
    D = L_new - L
    if not 1 <= D <= L:
        raise ValueError(f"lag grows by D = L' - L layers with 1 <= D <= L; got L={L}, L'={L_new}")
    if not isinstance(start, int) or isinstance(start, bool) or not 1 <= start <= L - D + 1:
        raise ValueError(f"lag: start is 1-indexed in [1, {L - D + 1}] for L={L}, L'={L_new}; got {start!r}")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1 or D % block != 0:
        raise ValueError(f"lag: block must divide D={D} (one of {[b for b in range(1, D + 1) if D % b == 0]}); "
                         f"got {block!r}")
    if init not in ("copy", "random"):
        raise ValueError(f"lag: init must be 'copy' or 'random', got {init!r}")
    s = start - 1
    order: list[int | None] = list(range(s))
    for k in range(D // block):
        blk = list(range(s + k * block, s + (k + 1) * block))
        order += blk
        order += blk if init == "copy" else [None] * block
    order += list(range(s + D, L))
    return order


def lag_design_space(L: int, L_new: int, inits: tuple[str, ...] = ("copy", "random")) -> list[dict]:
    """All valid (start, block, init) candidates of the LAG design space for L -> L_new, as option dicts for
    ``make_plan("lag", ...)``: (L - D + 1) starts x (#divisors of D) blocks x len(inits)."""
    D = L_new - L
    if not 1 <= D <= L:
        raise ValueError(f"lag grows by D = L' - L layers with 1 <= D <= L; got L={L}, L'={L_new}")
    for init in inits:
        if init not in ("copy", "random"):
            raise ValueError(f"lag: init must be 'copy' or 'random', got {init!r}")
    blocks = [b for b in range(1, D + 1) if D % b == 0]
    return [{"start": s, "block": b, "init": i} for s, b, i in product(range(1, L - D + 2), blocks, inits)]


def lag(old: ModelConfig, new: ModelConfig, seed: int = 0, *, start: int | None = None, block: int | None = None,
        init: str = "copy", fade_steps: int = 0, state: str = "zero") -> GrowthPlan:
    """One point of the LAG design space (see ``lag_order``). Defaults: start = L - D + 1 and block = D, i.e. the
    last D layers copied on top (gradual post-stacking, Reddi et al. 2023)."""
    _check_common(fade_steps, state)
    o, n = _depth_only("lag", old, new)
    L, L2 = o.n_layer, n.n_layer
    D = L2 - L
    start = L - D + 1 if start is None else start
    block = D if block is None else block
    order = lag_order(L, L2, start, block, init)
    opts = {"start": start, "block": block, "init": init, "fade_steps": fade_steps, "state": state}
    return layer_plan("lag", o, n, _order_specs(order), seed, opts, fade_steps, state)


def identity(old: ModelConfig, new: ModelConfig, seed: int = 0, *, positions: list[int] | None = None,
             every: int | None = None, init: str = "random", fade_steps: int = 0,
             state: str = "zero") -> GrowthPlan:
    """Function-preserving insertion of L' - L new blocks whose output projections (attention ``wo`` and MLP
    ``w_down``) are zero: in a pre-norm residual net such a block adds nothing, yet ``wo``/``w_down`` get
    gradients at once (zeroing a norm gain instead would not). Other weights are random (``init='random'``) or
    copied from the preceding old layer (``init='copy'``; the following one for a block at position 0).

    Where: ``positions`` = target-layer indices of the new blocks; or ``every=k``: a new block after every k-th
    old layer; default: all new blocks at the end."""
    _check_common(fade_steps, state)
    o, n = _depth_only("identity", old, new)
    L, L2 = o.n_layer, n.n_layer
    m = L2 - L
    if init not in ("random", "copy"):
        raise ValueError(f"identity: init must be 'random' or 'copy', got {init!r}")
    if positions is not None and every is not None:
        raise ValueError("identity: give positions or every, not both")
    if every is not None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"identity: every must be a positive integer, got {every!r}")
        if m > L // every:
            raise ValueError(f"identity: every={every} gives only {L // every} slots for {m} new blocks")
        positions, t = [], 0
        for i in range(L):
            t += 1
            if (i + 1) % every == 0 and len(positions) < m:
                positions.append(t)
                t += 1
    elif positions is None:
        positions = list(range(L, L2))
    if (not isinstance(positions, (list, tuple)) or len(positions) != m or len(set(positions)) != m
            or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < L2 for p in positions)):
        raise ValueError(f"identity: positions must be {m} distinct target-layer indices in [0, {L2}), "
                         f"got {positions!r}")
    pos = set(positions)
    old_iter = iter(range(L))
    src: list[int | None] = [None if i in pos else next(old_iter) for i in range(L2)]
    specs: list[LayerSpec] = []
    for i, j in enumerate(src):
        if j is not None:
            specs.append(("copy", j, j))
        else:
            prev = next((src[k] for k in range(i - 1, -1, -1) if src[k] is not None), None)
            nxt = next((src[k] for k in range(i + 1, L2) if src[k] is not None), None)
            neighbour = prev if prev is not None else nxt
            specs.append(("identity", neighbour if init == "copy" else None, neighbour))
    plan = layer_plan("identity", o, n, specs, seed,
                      {"positions": list(positions), "init": init, "fade_steps": fade_steps, "state": state},
                      fade_steps, state)
    return plan


OUTPUT_PROJECTIONS = ("attn.wo.weight", "mlp.w_down.weight")


def split(old: ModelConfig, new: ModelConfig, seed: int = 0, *, layout: str = "stack", fade_steps: int = 0,
          state: str = "zero") -> GrowthPlan:
    """Split stacking (nanogrow's own operator; the Handbook's G2 tables motivate it): copy the layers as ``stack``
    (``layout='stack'``: 0 1 .. L-1 0 1 ..) or ``interleave`` (0 0 1 1 ..) does, then divide the output
    projections (``wo``, ``w_down``) of every copy of old layer j by k_j, the number of copies of j.

    Why: in a pre-norm residual net each block adds ``f_j(h)`` to the stream; a plain copy adds it k times (the
    function jumps, the loss with it), an identity block adds nothing (the function is kept, but the new blocks
    start from nothing). Here the k copies add ``f_j / k`` each, so the grown net is the old one integrated with
    a k-times finer step (the residual stream read as an ODE, forward Euler): to first order the same function,
    while every new block carries all of the old layer's learned features. Exactly: the copies' output
    projections sum to the old one, every other weight is an exact copy, and Adam's moments follow the weights
    (exp_avg / k, exp_avg_sq / k^2: the first Adam update is unchanged). Needs n_layer to grow by an integer
    factor for ``layout='interleave'``; ``stack`` also takes a partial last repeat (its layers get their own
    k_j)."""
    _check_common(fade_steps, state)
    if layout not in ("stack", "interleave"):
        raise ValueError(f"split: layout must be 'stack' or 'interleave', got {layout!r}")
    o, n = _depth_only("split", old, new)
    L, L2 = o.n_layer, n.n_layer
    if layout == "interleave" and L2 % L != 0:
        raise ValueError(f"split: layout='interleave' needs n_layer to grow by an integer factor (old {L}, "
                         f"new {L2}); use layout='stack'")
    src = [i % L for i in range(L2)] if layout == "stack" else [i // (L2 // L) for i in range(L2)]
    plan = layer_plan("split", o, n, _order_specs(src), seed, {"layout": layout, "fade_steps": fade_steps,
                                                                "state": state}, fade_steps, state)
    copies = {j: src.count(j) for j in set(src)}
    for i, j in enumerate(src):
        for suffix in OUTPUT_PROJECTIONS:
            pp = plan.targets[f"layers.{i}.{suffix}"]
            pp.pieces = [replace(piece, scale=piece.scale / copies[j]) for piece in pp.pieces]
    return plan


OPERATORS = {"stack": stack, "interleave": interleave, "lag": lag, "identity": identity, "split": split}
