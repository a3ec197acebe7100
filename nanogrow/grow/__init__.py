"""Growth: operators that build GrowthPlans, the plan machinery, and optimizer / learning-rate transfer.

    plan = make_plan("lag", old_cfg, new_cfg, seed=0, start=2, block=1, init="copy")
    new_model, new_opt = grow(model, opt, plan, policy="map+age")
    ramp = plan.mask_ramp(step)          # None unless something fades in; checkpoint ramp.to_dict()

Operators (``OPERATORS``): depth ``stack``, ``interleave``, ``lag``, ``identity``; width ``zero``, ``net2net``,
``vt``, ``msg``; ``joint`` (one depth op and one width op composed into one plan); ``learned`` (LiGO-style linear
maps of the old weights, initialised from a plain operator and fitted on the LM loss: ``learned.fit``).
"""

from __future__ import annotations

from nanogrow.grow.lr import GrowthLR, stagewise_lr_scales
from nanogrow.grow.optim import AdamW, grow, make_optimizer, param_groups, transfer_optimizer_state
from nanogrow.grow.compose import compose
from nanogrow.grow.fade import MaskRamp
from nanogrow.grow.plan import Fresh, GrowthPlan, ParamPlan, Piece
from nanogrow.grow.schema import param_shapes
from nanogrow.grow.registry import (DEPTH_OPERATORS, OPERATORS, WIDTH_OPERATORS, joint, make_plan, operator_options,
                                    plan_from_dict)

__all__ = [
    "OPERATORS", "DEPTH_OPERATORS", "WIDTH_OPERATORS", "make_plan", "operator_options", "plan_from_dict", "joint",
    "compose", "grow", "transfer_optimizer_state", "AdamW", "make_optimizer", "param_groups", "GrowthLR",
    "stagewise_lr_scales", "GrowthPlan", "ParamPlan", "Piece", "Fresh", "MaskRamp", "param_shapes",
]
