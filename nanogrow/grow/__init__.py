"""Growth: operators that build GrowthPlans, the plan machinery, and optimizer / learning-rate transfer.

    plan = make_plan("lag", old_cfg, new_cfg, seed=0, start=2, block=1, init="copy")
    new_model, new_opt = grow(model, opt, plan, policy="map+age")
    ramp = plan.mask_ramp(step)          # None unless something fades in; checkpoint ramp.to_dict()

Operators (``OPERATORS``): depth ``stack``, ``interleave``, ``lag``, ``identity``; width ``zero``, ``net2net``,
``vt``, ``msg``; ``joint`` (one depth op and one width op composed into one plan); ``learned`` (LiGO-style linear
maps of the old weights, initialised from a plain operator and fitted on the LM loss: ``learned.fit``).
"""

from __future__ import annotations

import inspect
from dataclasses import replace

from nanogrow.grow import depth, learned, width
from nanogrow.grow.plan import (
    Fresh, GrowthPlan, MaskRamp, ParamPlan, Piece, check_growth, compose, param_shapes,
)
from nanogrow.model import ModelConfig

DEPTH_OPERATORS = {"stack": depth.stack, "interleave": depth.interleave, "lag": depth.lag,
                   "identity": depth.identity}
WIDTH_OPERATORS = {"zero": width.zero, "net2net": width.net2net, "vt": width.vt, "msg": width.msg}


def joint(old: ModelConfig, new: ModelConfig, seed: int = 0, *, depth_op: str = "stack", width_op: str = "zero",
          depth_options: dict | None = None, width_options: dict | None = None,
          order: str = "width-first") -> GrowthPlan:
    """Depth and width in one event: the composition of a width plan and a depth plan. ``order='width-first'``
    widens the old layers, then builds the new layers at the new width; ``'depth-first'`` the other way round.
    Masks of both (if any) must use the same ``fade_steps``."""
    if depth_op not in DEPTH_OPERATORS:
        raise ValueError(f"joint: unknown depth_op {depth_op!r}; known: {', '.join(DEPTH_OPERATORS)}")
    if width_op not in WIDTH_OPERATORS:
        raise ValueError(f"joint: unknown width_op {width_op!r}; known: {', '.join(WIDTH_OPERATORS)}")
    if order not in ("width-first", "depth-first"):
        raise ValueError(f"joint: order must be 'width-first' or 'depth-first', got {order!r}")
    d_opts, w_opts = dict(depth_options or {}), dict(width_options or {})
    _check_options(depth_op, d_opts, "depth_options")
    _check_options(width_op, w_opts, "width_options")
    o, n = check_growth(old, new)
    if order == "width-first":
        mid = replace(n, n_layer=o.n_layer)
        a = WIDTH_OPERATORS[width_op](o, mid, seed, **w_opts)
        b = DEPTH_OPERATORS[depth_op](a.new_cfg, replace(n, norm_eps=a.new_cfg.norm_eps), seed, **d_opts)
    else:
        mid = replace(o, n_layer=n.n_layer, init_std=n.init_std)
        a = DEPTH_OPERATORS[depth_op](o, mid, seed, **d_opts)
        b = WIDTH_OPERATORS[width_op](a.new_cfg, n, seed, **w_opts)
    c = compose(a, b)
    options = {"depth_op": depth_op, "width_op": width_op, "depth_options": d_opts, "width_options": w_opts,
               "order": order}
    return GrowthPlan("joint", options, c.old_cfg, c.new_cfg, seed, c.targets, c.masks, c.fade_steps,
                      parts=[a, b])


# ``learned`` (LiGO-style, learned.py): depth and/or width in one plan of linear maps, fitted by the caller.
OPERATORS = {**DEPTH_OPERATORS, **WIDTH_OPERATORS, "joint": joint, "learned": learned.learned}


def operator_options(op: str) -> list[str]:
    """The keyword options an operator accepts."""
    if op not in OPERATORS:
        raise ValueError(f"unknown growth operator {op!r}; known operators: {', '.join(OPERATORS)}")
    sig = inspect.signature(OPERATORS[op])
    return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _check_options(op: str, options: dict, where: str = "options") -> None:
    valid = operator_options(op)
    for k in options:
        if k not in valid:
            raise ValueError(f"unknown option {k!r} for growth operator {op!r} (in {where}); valid options: "
                             f"{', '.join(valid) or 'none'}")


def make_plan(op: str, old_cfg: ModelConfig, new_cfg: ModelConfig, seed: int = 0, **options) -> GrowthPlan:
    """Build the GrowthPlan of operator ``op`` for old_cfg -> new_cfg. Pure: no tensor is touched; every bad
    input (unknown operator or option, a shrinking or changing shape the operator cannot do, vocab change, head
    counts that do not divide...) raises ValueError here, before anything changes."""
    if op not in OPERATORS:
        raise ValueError(f"unknown growth operator {op!r}; known operators: {', '.join(OPERATORS)}")
    _check_options(op, options)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return OPERATORS[op](old_cfg, new_cfg, seed, **options)


from nanogrow.grow.optim import AdamW, grow, transfer_optimizer_state  # noqa: E402  (optim imports plan only)
from nanogrow.grow.lr import GrowthLR, stagewise_lr_scales  # noqa: E402

__all__ = [
    "OPERATORS", "make_plan", "operator_options", "joint", "compose", "grow", "transfer_optimizer_state", "AdamW",
    "GrowthLR", "stagewise_lr_scales", "GrowthPlan", "ParamPlan", "Piece", "Fresh", "MaskRamp", "param_shapes",
]
