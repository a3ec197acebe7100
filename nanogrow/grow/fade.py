"""Fade-in (MSG-style, Yao et al. 2024) at run time: ``MaskRamp``, the small checkpointable state that gives the
mask buffers' values at a step and removes them when the ramp ends, and the buffer helpers every backend uses. A
plan says which mask elements fade (``GrowthPlan.masks``); this module drives them."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from nanogrow.grow.schema import mask_shapes

def index_runs(flat: torch.Tensor) -> list[list[int]]:
    """Sorted flat indices -> [[start, stop), ...] runs (compact JSON)."""
    idx = flat.tolist()
    out: list[list[int]] = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


@dataclass
class MaskRamp:
    """Checkpointable state of an MSG-style fade-in: masks are 1 on old elements and m(step) on fading ones,
    m rising linearly from 0 at ``start_step`` to 1 at ``start_step + steps``; after that the masks are removed
    (set to None) so the steady state costs nothing. JSON-able via ``to_dict``/``from_dict``."""

    start_step: int
    steps: int
    masks: dict[str, dict] = field(default_factory=dict)  # name -> {"shape": [...], "fading": [[a, b), ...]}

    def value(self, step: int) -> float:
        if self.steps <= 0:
            return 1.0
        return min(max((step - self.start_step) / self.steps, 0.0), 1.0)

    def done(self, step: int) -> bool:
        return self.value(step) >= 1.0

    def mask_values(self, step: int, device=None) -> dict[str, torch.Tensor | None]:
        m = self.value(step)
        out: dict[str, torch.Tensor | None] = {}
        for name, spec in self.masks.items():
            if m >= 1.0:
                out[name] = None
                continue
            shape = tuple(spec["shape"])
            t = torch.ones(math.prod(shape), dtype=torch.float32)
            for a, b in spec["fading"]:
                t[a:b] = m
            out[name] = t.view(shape).to(device)
        return out

    def apply(self, model: torch.nn.Module, step: int) -> bool:
        """Set the model's mask buffers for ``step``; returns True once the ramp is over (masks removed)."""
        device = next(model.parameters()).device
        for name, val in self.mask_values(step, device).items():
            set_buffer(model, name, val)
        return self.done(step)

    def to_dict(self) -> dict:
        return {"start_step": self.start_step, "steps": self.steps, "masks": copy.deepcopy(self.masks)}

    @classmethod
    def from_dict(cls, d: dict) -> "MaskRamp":
        return cls(int(d["start_step"]), int(d["steps"]), copy.deepcopy(d.get("masks", {})))


def set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor | None) -> None:
    mod_name, _, buf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if buf not in mod._buffers:
        raise KeyError(f"{name} is not a buffer of the model")
    mod._buffers[buf] = value


def active_masks(model: torch.nn.Module) -> list[str]:
    names = set(mask_shapes(model.config))
    return [n for n, b in model.named_buffers() if n in names and b is not None]
