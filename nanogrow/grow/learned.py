"""The learned growth operator (LiGO: Wang et al. 2023, "Learning to Grow Pretrained Models for Efficient
Transformer Training"): every grown weight is a LINEAR function of the old weights, with the linear maps fitted
for a few steps on the grown model's language-modelling loss while the old weights stay frozen.

The maps (``LearnedPlan.maps``, name -> float32 tensor):

* width, applied first, per axis that grows, as expansion matrices (n_new x n_old) — a weight W (out x in) becomes
  ``A_out @ W @ A_in^T``:
  - ``d_model.out`` / ``d_model.in``: the residual stream, ONE pair shared by every layer (as LiGO ties it: all
    layers read and write the same residual stream). ``out`` expands the writers (embedding columns, ``wo`` and
    ``w_down`` rows) and the block RMSNorm gains, ``in`` the readers (``wq/wk/wv/w_gate/w_up`` and LM-head columns;
    with tied embeddings the final norm gain, see ``net2net``);
  - ``layers.{j}.d_ff.out`` / ``.in``: MLP hidden units of old layer j (``w_gate``/``w_up`` rows, ``w_down``
    columns), one pair per layer: hidden units are private to their layer;
  - ``layers.{j}.heads.q_out`` / ``.q_in`` / ``.kv_out``: per layer, over whole heads (H2 x H, K2 x K, applied as
    ``A kron I_head_dim``, so a head's internal layout and RoPE pairs stay intact): ``q_out`` makes ``wq`` rows,
    ``q_in`` the ``wo`` columns, ``kv_out`` the ``wk``/``wv`` rows.
* depth, applied to the widened old layers: ``depth.{param}`` (n_layer_new x n_layer_old) per parameter kind
  (``attn.wq.weight``, ``mlp_norm.weight``, ...): new layer i's parameter = sum_j depth[i, j] * widened old layer j's.

Initialisation reproduces a plain operator EXACTLY: depth from any copy-only depth operator (``init``: ``stack``,
``interleave``, or ``lag`` with ``init='copy'``; ``init_options`` go to it) as a 0/1 matrix; width from Net2Net
(noise 0): ``out`` = the selection matrix (new unit u copies old unit u mod C), ``in`` = selection / copy count.
Axes that do not grow have no map (identity, not learned): a depth-only growth learns only the depth
coefficients, like LiGO's depth operator.

The plan lowers to ``plan.LinearPiece``s (target = sum_j coef_j * L_j @ old_j @ R_j^T), so the one-process,
DDP, FSDP (``grow_sharded``: gathers the few sources a target reads) and ZeRO paths apply it through
``ParamPlan.materialize`` like any other plan, weights and optimizer state alike. Moment mapping, and why:

* ``exp_avg`` maps like the weights: a new weight that is a linear function of old ones moves, under the old
  coordinates' momentum, with that same linear function of the old momenta;
* ``exp_avg_sq`` maps by the element-wise squared coefficients, coef^2 * (L*L) @ v @ (R*R)^T: the second moment of a
  linear combination sum_k a_k g_k is sum_k a_k^2 E[g_k^2] + cross terms E[g_k g_l], which Adam never tracked
  (it keeps the diagonal only); dropping them is the diagonal approximation. It keeps v >= 0 and, for any map with
  one non-zero per row (every gather: stack, Net2Net), equals the existing gather rule (scale^2) exactly;
* ``age`` (per-element step count for bias correction) and ``lr_scale``: the |coefficient|-weighted mean over the
  old elements that contribute. For a gather-like map it is the copy the plain operator makes; for a mixture it
  says "trained about as long as what it is made of" (a max would call a mixture of a trained and a 2-step-old
  element fully trained; a mean is also linear, so it costs the same matmuls as the weights).

Fitting (``fit``): the grown model's weights are computed functionally from maps + frozen old weights through the
very ``materialize`` that later writes them (``torch.func.functional_call``), Adam on the maps for ``steps`` steps
with learning rate ``lr`` for the depth coefficients and lr / n_old for the entries of an (n_new x n_old) width
map (so a new unit, a mix of n_old old ones, moves about as much per step as a layer does); under data
parallelism every rank fits the same maps: their gradients are all-reduced (``reduce_grads``). The FLOPs spent
(grown-model training FLOPs on the fitting tokens + 3x the map products) are reported in ``plan.fit_record`` so a
run can count them.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import torch

from nanogrow.grow import depth
from nanogrow.grow.execute import build_grown_model
from nanogrow.grow.plan import GrowthPlan, LinearPiece, ParamPlan, copy_piece
from nanogrow.grow.schema import LAYER_PARAMS, check_growth, check_options, param_shapes
from nanogrow.grow.width import check_tiling_factor, head_maps, plain_map
from nanogrow.model import ModelConfig

DEPTH_INITS = ("stack", "interleave", "lag")
WIDTH_INITS = ("net2net",)
# Above this many map elements a plan record keeps a summary instead of the maps (the grown weights are in the
# checkpoint anyway; the record is for the run's history).
RECORD_MAX_ELEMENTS = 1 << 16


@dataclass(eq=False)
class LearnedPlan(GrowthPlan):
    """A GrowthPlan of LinearPieces plus the maps it was lowered from (and, once fitted, the fit record)."""

    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    fit_record: dict | None = None

    @property
    def fitted(self) -> bool:
        return self.fit_record is not None

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.fit_record is None:
            return d  # make_plan rebuilds an unfitted plan from its options
        d["fit"] = dict(self.fit_record)
        n = sum(t.numel() for t in self.maps.values())
        if n <= RECORD_MAX_ELEMENTS:
            d["maps"] = {k: t.tolist() for k, t in self.maps.items()}
        else:
            d["maps_omitted"] = {k: list(t.shape) for k, t in self.maps.items()}
        return d


def plan_from_record(d: dict) -> LearnedPlan:
    """Rebuild a fitted learned plan from ``LearnedPlan.to_dict`` (``registry.plan_from_dict`` sends it here)."""
    if "maps" not in d:
        raise ValueError("this learned plan's record omits its maps (more than "
                         f"{RECORD_MAX_ELEMENTS} elements); its grown weights are in the checkpoint")
    base = learned(ModelConfig(**d["old"]), ModelConfig(**d["new"]), d["seed"], **d["options"])
    maps = {k: torch.tensor(v, dtype=torch.float32) for k, v in d["maps"].items()}
    if sorted(maps) != sorted(base.maps) or any(maps[k].shape != base.maps[k].shape for k in maps):
        raise ValueError("learned plan record: its maps do not match the operator's map names and shapes")
    return lower(base, maps, fit_record=d.get("fit"))


# ----------------------------------------------------------------------------------------------------------
# Initial maps
# ----------------------------------------------------------------------------------------------------------

def _selection(n_new: int, n_old: int, dst: torch.Tensor, src: torch.Tensor, counts: torch.Tensor):
    """(out, in) expansion matrices of a Net2Net unit map: out[u, src] = 1, in[u, src] = 1 / copies of src."""
    out = torch.zeros(n_new, n_old, dtype=torch.float32)
    out[dst, src] = 1.0
    inn = torch.zeros(n_new, n_old, dtype=torch.float32)
    inn[dst, src] = (1.0 / counts).to(torch.float32)
    return out, inn


def _depth_init(init: str, init_options: dict, o: ModelConfig, n: ModelConfig, seed: int) -> torch.Tensor:
    """The 0/1 (L' x L) matrix of a copy-only depth operator, read from that operator's own plan."""
    operator = depth.OPERATORS[init]  # init is one of DEPTH_INITS (checked by ``learned``)
    check_options(init, operator, init_options)
    plan = operator(o, replace(o, n_layer=n.n_layer), seed, **init_options)
    if plan.masks:
        raise ValueError(f"learned: init_options fade new layers in (fade_steps={plan.fade_steps}); the learned "
                         "operator has no masks: drop fade_steps")
    m = torch.zeros(n.n_layer, o.n_layer, dtype=torch.float32)
    for i in range(n.n_layer):
        srcs = {plan.targets[f"layers.{i}.{s}"].copies_whole for s in LAYER_PARAMS}
        layers = {s.split(".")[1] for s in srcs if s is not None}
        if None in srcs or len(layers) != 1:
            raise ValueError(f"learned: init={init!r} makes layer {i} from something other than a whole old layer "
                             f"(fresh or mixed weights); the learned operator starts from a copy-only depth "
                             f"operator: {', '.join(DEPTH_INITS)} (lag with init='copy')")
        m[i, int(layers.pop())] = 1.0
    return m


def initial_maps(o: ModelConfig, n: ModelConfig, seed: int, init: str, init_options: dict,
                 width_init: str) -> dict[str, torch.Tensor]:
    if n.d_model != o.d_model and width_init == "net2net":
        check_tiling_factor(o.d_model, n.d_model)  # the same refusal as the net2net operator, for the same reason
    maps = {f"depth.{s}": None for s in LAYER_PARAMS}
    m = _depth_init(init, init_options, o, n, seed)
    for s in LAYER_PARAMS:
        maps[f"depth.{s}"] = m.clone()
    if n.d_model != o.d_model:
        um = plain_map(o.d_model, n.d_model, width_init, "d_model")
        maps["d_model.out"], maps["d_model.in"] = _selection(n.d_model, o.d_model, um.dst_old, um.src_old,
                                                             um.counts())
    for j in range(o.n_layer):
        if n.d_ff != o.d_ff:
            um = plain_map(o.d_ff, n.d_ff, width_init, "d_ff")
            maps[f"layers.{j}.d_ff.out"], maps[f"layers.{j}.d_ff.in"] = _selection(
                n.d_ff, o.d_ff, um.dst_old, um.src_old, um.counts())
        if (n.n_head, n.n_kv_head) != (o.n_head, o.n_kv_head):
            q, kv = head_maps(o.n_head, o.n_kv_head, n.n_head, n.n_kv_head, width_init)
            maps[f"layers.{j}.heads.q_out"], maps[f"layers.{j}.heads.q_in"] = _selection(
                n.n_head, o.n_head, q.dst_old, q.src_old, q.counts())
            maps[f"layers.{j}.heads.kv_out"] = _selection(n.n_kv_head, o.n_kv_head, kv.dst_old, kv.src_old,
                                                          kv.counts())[0]
    return maps


# ----------------------------------------------------------------------------------------------------------
# Lowering maps to LinearPieces
# ----------------------------------------------------------------------------------------------------------

def _layer_maps(maps: dict, j: int, suffix: str, head_dim: int):
    """(left, right, left_block, right_block) that widen old layer j's parameter ``suffix``."""
    g = maps.get
    dm_out, dm_in = g("d_model.out"), g("d_model.in")
    if suffix.endswith("norm.weight"):
        return dm_out, None, 1, 1
    if suffix == "attn.wq.weight":
        return g(f"layers.{j}.heads.q_out"), dm_in, head_dim, 1
    if suffix in ("attn.wk.weight", "attn.wv.weight"):
        return g(f"layers.{j}.heads.kv_out"), dm_in, head_dim, 1
    if suffix == "attn.wo.weight":
        return dm_out, g(f"layers.{j}.heads.q_in"), 1, head_dim
    if suffix in ("mlp.w_gate.weight", "mlp.w_up.weight"):
        return g(f"layers.{j}.d_ff.out"), dm_in, 1, 1
    if suffix == "mlp.w_down.weight":
        return dm_out, g(f"layers.{j}.d_ff.in"), 1, 1
    raise KeyError(suffix)


def _value(c) -> float:
    return float(c.detach()) if isinstance(c, torch.Tensor) else float(c)


def _targets(o: ModelConfig, n: ModelConfig, maps: dict, keep_zeros: bool) -> dict[str, ParamPlan]:
    """One ParamPlan per grown parameter. ``keep_zeros``: keep pieces whose depth coefficient is 0 (fitting
    needs their gradient; a final plan drops them, so a stack-initialised target reads one old layer)."""
    dm_out, dm_in = maps.get("d_model.out"), maps.get("d_model.in")
    outer = {"tok_emb.weight": (None, dm_out), "lm_head.weight": (None, dm_in),
             # Tied embeddings: the head reads with the (writer-expanded) embedding, so the final gain takes the
             # reader map (Net2Net: tiled gain / copy count); untied, it is a gain like the blocks'.
             "norm.weight": (dm_in if n.tie_embeddings else dm_out, None)}
    targets: dict[str, ParamPlan] = {}
    for name, shape in param_shapes(n).items():
        if not name.startswith("layers."):
            left, right = outer[name]
            pieces = [LinearPiece(name, left, right)] if left is not None or right is not None else \
                [copy_piece(name, len(shape))]
            targets[name] = ParamPlan(name, shape, pieces)
            continue
        i, suffix = name.split(".", 2)[1:]
        coefs = maps[f"depth.{suffix}"][int(i)]
        pieces = []
        for j in range(o.n_layer):
            if not keep_zeros and float(coefs[j]) == 0.0:
                continue
            left, right, lb, rb = _layer_maps(maps, j, suffix, o.head_dim)
            c = coefs[j] if keep_zeros else float(coefs[j])
            pieces.append(LinearPiece(f"layers.{j}.{suffix}", left, right, c, lb, rb))
        if not pieces:  # an all-zero row: the target is zero (age 0), still a well-formed linear target
            left, right, lb, rb = _layer_maps(maps, 0, suffix, o.head_dim)
            pieces = [LinearPiece(f"layers.0.{suffix}", left, right, 0.0, lb, rb)]
        # The dominant source first: it is the target's primary source (param group, describe()).
        pieces.sort(key=lambda p: -abs(_value(p.coef)))
        p = pieces[0]
        if len(pieces) == 1 and p.left is None and p.right is None and _value(p.coef) == 1.0 and not keep_zeros:
            pieces = [copy_piece(p.source, len(shape))]  # a plain copy: FSDP can copy it shard to shard
        targets[name] = ParamPlan(name, shape, pieces)
    return targets


def lower(base: GrowthPlan, maps: dict[str, torch.Tensor], fit_record: dict | None = None) -> LearnedPlan:
    """The (final) plan of ``maps`` with ``base``'s configs and options."""
    maps = {k: v.detach().to(torch.float32).clone() for k, v in maps.items()}
    o, n = base.old_cfg, base.new_cfg
    notes = []
    if fit_record:
        notes.append(f"maps fitted: {fit_record['steps']} steps, loss {fit_record['loss_first']:.4f} -> "
                     f"{fit_record['loss_last']:.4f}, {fit_record['flops']:.3g} FLOPs")
    return LearnedPlan("learned", dict(base.options), o, n, base.seed, _targets(o, n, maps, keep_zeros=False),
                       notes=notes, maps=maps, fit_record=fit_record)


# ----------------------------------------------------------------------------------------------------------
# The operator
# ----------------------------------------------------------------------------------------------------------

def learned(old: ModelConfig, new: ModelConfig, seed: int = 0, *, init: str = "stack",
            init_options: dict | None = None, width_init: str = "net2net", steps: int = 20,
            lr: float = 1e-3) -> LearnedPlan:
    """LiGO-style learned depth/width growth (module docstring). Returns the plan at its initial maps, which
    reproduces ``init`` (+ Net2Net for width) exactly; ``fit`` trains the maps for ``steps`` Adam steps at ``lr``
    (``steps=0``: the plain operator)."""
    if init not in DEPTH_INITS:
        raise ValueError(f"learned: init must be one of {', '.join(DEPTH_INITS)} (a copy-only depth operator), "
                         f"got {init!r}")
    if init_options is not None and not isinstance(init_options, dict):
        raise ValueError(f"learned: init_options must be a table of options for {init!r}, got {init_options!r}")
    if width_init not in WIDTH_INITS:
        raise ValueError(f"learned: width_init must be one of {', '.join(WIDTH_INITS)}, got {width_init!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"learned: steps must be a non-negative integer, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"learned: lr must be a positive number, got {lr!r}")
    init_options = dict(init_options or {})
    o, n = check_growth(old, new)
    n = replace(n, norm_eps=o.norm_eps)  # Net2Net tiling keeps RMSNorm's mean square: eps unchanged
    try:
        maps = initial_maps(o, n, seed, init, init_options, width_init)
    except ValueError as e:
        raise ValueError(e if str(e).startswith("learned") else f"learned: {e}") from None
    options = {"init": init, "init_options": init_options, "width_init": width_init, "steps": steps,
               "lr": float(lr)}
    base = GrowthPlan("learned", options, o, n, seed, {})
    return lower(base, maps)


# ----------------------------------------------------------------------------------------------------------
# Fitting the maps
# ----------------------------------------------------------------------------------------------------------

def map_flops(plan: LearnedPlan) -> float:
    """FLOPs of one forward computation of every grown weight from the maps (all pieces, zeros included)."""
    shapes = param_shapes(plan.old_cfg)
    targets = _targets(plan.old_cfg, plan.new_cfg, plan.maps, keep_zeros=True)
    return sum(p.flops(shapes[p.source]) for pp in targets.values() for p in pp.pieces if p.is_linear)


def grown_params(plan: GrowthPlan, old: Mapping[str, torch.Tensor], targets: dict | None = None):
    """name -> grown weight, differentiable w.r.t. any tensor the plan's pieces hold."""
    targets = plan.targets if targets is None else targets
    return {name: pp.materialize(old.__getitem__, "param") for name, pp in targets.items()}


def fit(plan: LearnedPlan, old: Mapping[str, torch.Tensor], next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        *, reduce_grads: Callable[[torch.Tensor], None] | None = None, autocast=None,
        log: Callable[[str], None] | None = None) -> LearnedPlan:
    """Train ``plan``'s maps for ``plan.options['steps']`` Adam steps on the grown model's LM loss, the old weights
    ``old`` (name -> full tensor) frozen; returns the fitted plan (its ``fit_record`` holds losses, tokens, FLOPs).

    ``next_batch()`` gives (inputs, targets) on the device; ``reduce_grads(flat)`` (optional) must average the
    flat map gradient (with the step's loss appended) over data-parallel ranks in place, so every rank takes the
    same steps and records the global loss."""
    if not isinstance(plan, LearnedPlan):
        raise TypeError(f"fit needs a learned plan, got op {plan.op!r}")
    if plan.fitted:
        raise ValueError("this learned plan is already fitted")
    steps, lr = int(plan.options["steps"]), float(plan.options["lr"])
    o, n = plan.old_cfg, plan.new_cfg
    device = next(iter(old.values())).device
    maps = {k: v.detach().to(device).clone().requires_grad_(True) for k, v in plan.maps.items()}
    leaves = list(maps.values())
    # Adam moves every entry by about lr per step. A depth coefficient scales one old layer: lr as given. A width
    # map row mixes n_old old units, so its entries take lr / n_old and a new unit moves by about lr too (with lr
    # for every entry, a 0.01 step on 128 entries turned a d_ff map into noise and the fit diverged).
    opt = torch.optim.Adam([{"params": [t], "lr": lr if k.startswith("depth.") else lr / t.shape[1]}
                            for k, t in maps.items()], lr=lr)
    module = build_grown_model(plan, device)  # buffers only: functional_call supplies the parameters
    losses, tokens = [], 0
    ctx = autocast or contextlib.nullcontext
    for _ in range(steps):
        x, y = next_batch()
        params = grown_params(plan, old, _targets(o, n, maps, keep_zeros=True))
        with ctx():
            loss = torch.func.functional_call(module, params, (x, y))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        loss = loss.detach().float().reshape(1)
        if reduce_grads is not None:  # one collective for all maps, and the loss rides along (for the record)
            flat = torch.cat([t.grad.reshape(-1) for t in leaves] + [loss])
            reduce_grads(flat)
            *grads, loss = flat.split([t.numel() for t in leaves] + [1])
            for t, g in zip(leaves, grads):
                t.grad.copy_(g.view_as(t))
        opt.step()
        losses.append(loss.item())
        tokens += y.numel()
    # Training FLOPs of the grown model on the fitting tokens (forward + backward) plus the map products
    # (forward, and about twice that backward). Per process: the caller scales by the number of ranks.
    flops = tokens * n.flops_per_token(y.shape[1] if steps else None) + 3.0 * steps * map_flops(plan)
    record = {"steps": steps, "lr": lr, "tokens": tokens, "flops": flops, "losses": losses,
              "loss_first": losses[0] if losses else float("nan"), "loss_last": losses[-1] if losses else float("nan")}
    if log is not None and losses:
        log(f"  learned growth: fitted maps {steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return lower(plan, maps, fit_record=record)
