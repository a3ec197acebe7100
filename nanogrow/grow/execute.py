"""Applying a GrowthPlan: what every executor does around ``ParamPlan.materialize``, and the one-process executor.

Every executor (one process: ``apply_to_model`` here, used by ``optim.grow``; FSDP2: ``parallel.sharded``; ZeRO:
``parallel.zero``) first checks that the model is what the plan grows (``check_model``), then builds the grown model
with ``build_grown_model`` (meta, ``to_empty``, RoPE, masks at their growth-step values), filling the new parameters
one at a time from ``plan.targets[name].materialize``, reading old tensors however it holds them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Mapping

import torch

from nanogrow.grow.fade import active_masks, set_buffer
from nanogrow.grow.plan import GrowthPlan
from nanogrow.grow.schema import FIXED_FIELDS, param_shapes, shape_dict
from nanogrow.model import ModelConfig, Transformer


def check_model(plan: GrowthPlan, model: Transformer) -> None:
    """Raise ValueError (before anything changes) if ``model`` is not what ``plan`` grows."""
    c = getattr(model, "config", None)
    if c is None or shape_dict(c) != shape_dict(plan.old_cfg):
        got = shape_dict(c) if c is not None else None
        raise ValueError(f"the model's shape {got} is not the plan's old shape {shape_dict(plan.old_cfg)}")
    for k in FIXED_FIELDS:
        if getattr(c, k) != getattr(plan.old_cfg, k):
            raise ValueError(f"the model's {k}={getattr(c, k)!r} differs from the plan's "
                             f"{getattr(plan.old_cfg, k)!r}")
    names = [n for n, _ in model.named_parameters()]
    if names != list(param_shapes(plan.old_cfg)):
        raise ValueError("the model's parameter names are not those of nanogrow.model.Transformer")
    act = active_masks(model)
    if act:
        raise ValueError(f"the model still has active growth masks ({', '.join(act[:3])}...): finish the "
                         "previous fade-in (MaskRamp.apply until done) before growing again")


def initial_mask_values(plan: GrowthPlan, device=None) -> dict[str, torch.Tensor]:
    """The grown model's mask buffers at the growth step: 0 where an element fades in, 1 elsewhere."""
    return {name: (~m).to(dtype=torch.float32, device=device) for name, m in plan.masks.items()}


def build_grown_model(plan: GrowthPlan, device, fill: Callable[[Transformer], None] | None = None,
                      training: bool = True, shard: Callable[[Transformer], None] | None = None) -> Transformer:
    """The grown model as every executor builds it: on the meta device (``shard`` it there, e.g. FSDP2's
    wrapping, while it holds no memory), ``to_empty`` on ``device``, its parameters written by ``fill(model)``
    under no_grad (None: left empty, for callers that supply parameters themselves), RoPE tables recomputed
    (``to_empty`` leaves buffers uninitialised), mask buffers at their growth-step values, and the old model's
    train/eval mode."""
    with torch.device("meta"):
        new_model = Transformer(replace(plan.new_cfg))
    if shard is not None:
        shard(new_model)
    new_model.to_empty(device=device)
    if fill is not None:
        with torch.no_grad():
            fill(new_model)
    new_model.reset_rope()
    for name, val in initial_mask_values(plan, device).items():
        set_buffer(new_model, name, val)
    new_model.train(training)
    return new_model


# ----------------------------------------------------------------------------------------------------------
# One-process application
# ----------------------------------------------------------------------------------------------------------

def apply_plan(plan: GrowthPlan, source: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
               kind: str = "param", **kw) -> dict[str, torch.Tensor]:
    """Every target of ``kind`` from old tensors (a state dict, or a ``read(name)`` function)."""
    read = source.__getitem__ if isinstance(source, Mapping) else source
    return {name: pp.materialize(read, kind, **kw) for name, pp in plan.targets.items()}


def apply_to_model(plan: GrowthPlan, old_model: Transformer, new_cfg: ModelConfig | None = None,
                   device: torch.device | str | None = None) -> Transformer:
    """Build the grown model: on the meta device, ``to_empty``, every parameter filled by its ParamPlan
    (one at a time), masks set to their growth-step values. ``new_cfg`` is optional and only checked: the
    plan's ``new_cfg`` is authoritative (a d_model operator may have rescaled ``norm_eps``)."""
    check_model(plan, old_model)
    if new_cfg is not None and shape_dict(new_cfg) != shape_dict(plan.new_cfg):
        raise ValueError(f"new_cfg shape {shape_dict(new_cfg)} is not the plan's {shape_dict(plan.new_cfg)}")
    old_params = dict(old_model.named_parameters())
    ref = next(iter(old_params.values()))
    device = ref.device if device is None else torch.device(device)

    def fill(new_model: Transformer) -> None:
        for name, p in new_model.named_parameters():
            pp = plan.targets[name]
            p.copy_(pp.materialize(lambda n: old_params[n].detach(), "param", device=device, dtype=p.dtype))
            p.requires_grad_(old_params[pp.primary_source].requires_grad if pp.primary_source else True)

    return build_grown_model(plan, device, fill, old_model.training)
