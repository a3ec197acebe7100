"""The operator registry: every growth operator by name, ``make_plan`` (validates, then builds the plan) and
``plan_from_dict`` (rebuilds a plan from its JSON record). Adding an operator is one function in ``depth.py``
(or a record in ``width.py``) and one line here."""

from __future__ import annotations

import functools
from dataclasses import replace

from nanogrow.grow import depth, learned, width
from nanogrow.grow.compose import compose
from nanogrow.grow.plan import GrowthPlan
from nanogrow.grow.schema import check_growth, check_options, keyword_options
from nanogrow.model import ModelConfig

DEPTH_OPERATORS = depth.OPERATORS
WIDTH_OPERATORS = width.OPERATORS


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
    return keyword_options(OPERATORS[op])


def _check_options(op: str, options: dict, where: str = "options") -> None:
    check_options(op, OPERATORS[op], options, where)


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


def plan_from_dict(d: dict) -> GrowthPlan:
    """Rebuild the identical plan from ``GrowthPlan.to_dict`` (a growth-history record)."""
    if d["op"] == "compose":
        return functools.reduce(compose, [plan_from_dict(p) for p in d["parts"]])
    if "maps" in d or "maps_omitted" in d:  # a fitted learned plan: its maps are data, not options
        return learned.plan_from_record(d)
    return make_plan(d["op"], ModelConfig(**d["old"]), ModelConfig(**d["new"]), seed=d["seed"], **d["options"])
