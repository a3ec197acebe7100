"""Learning rate across growth events.

``GrowthLR`` wraps any base schedule (a function step -> lr) and says what happens after a growth event:

    continue   the base schedule, as if nothing happened
    rewarm     the base schedule times a linear ramp from ``start_fraction`` to 1 over ``warmup_steps`` after
               each growth
    rewind     back to the peak: after a growth at step s the lr is schedule(peak_step + (step - s)), i.e. the
               schedule's clock is rewound to its peak and its decay continues from there (optionally with the
               rewarm ramp on top when ``warmup_steps`` > 0)

Its state (the policy and the growth steps seen) is JSON-able, so a resumed run continues it.

The Variance-Transfer paper's stage-wise adaptation (Yuan et al. 2023, eq. 5 / Table 1): the sub-network added
at stage t of a layer gets eta_t = eta_0 * ||W_dt||_F / ||W_0||_F. ``stagewise_lr_scales`` computes that factor
from the plan's pieces (which elements are fresh) and the grown weights, to be stored as the per-element
``lr_scale`` optimizer state (``grow(..., lr_adapt="vt")``). Simplifications, stated: the factor is computed once
at the growth step (the paper's f may track train-time statistics), and W_0 is taken as all the gathered (old)
elements of the same tensor. For Adam the paper's appendix C adapts by a per-sub-network step count instead,
which is the ``map+age`` transfer policy with nanogrow's ``AdamW``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from nanogrow.grow.schema import param_shapes

if TYPE_CHECKING:
    from nanogrow.grow.plan import GrowthPlan


KINDS = ("continue", "rewarm", "rewind")


@dataclass
class GrowthLR:
    kind: str = "continue"
    warmup_steps: int = 0
    start_fraction: float = 0.0
    peak_step: int = 0
    events: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"GrowthLR.kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"GrowthLR.warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if not 0.0 <= self.start_fraction <= 1.0:
            raise ValueError(f"GrowthLR.start_fraction must be in [0, 1], got {self.start_fraction!r}")
        if self.kind == "rewarm" and self.warmup_steps == 0:
            raise ValueError("GrowthLR(kind='rewarm') needs warmup_steps > 0")
        if not isinstance(self.peak_step, int) or self.peak_step < 0:
            raise ValueError(f"GrowthLR.peak_step must be a non-negative integer, got {self.peak_step!r}")

    def on_growth(self, step: int) -> None:
        """Record a growth event at ``step`` (the first step trained with the grown model)."""
        self.events.append(int(step))
        self.events.sort()

    def last_event(self, step: int) -> int | None:
        past = [s for s in self.events if s <= step]
        return past[-1] if past else None

    def lr(self, step: int, schedule: Callable[[int], float]) -> float:
        s = self.last_event(step)
        if s is None or self.kind == "continue":
            return schedule(step)
        base = schedule(self.peak_step + (step - s)) if self.kind == "rewind" else schedule(step)
        if self.warmup_steps > 0 and step - s < self.warmup_steps:
            f = self.start_fraction + (1.0 - self.start_fraction) * (step - s) / self.warmup_steps
            return base * f
        return base

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, d: dict) -> "GrowthLR":
        return cls(**{**d, "events": list(d.get("events", []))})


@torch.no_grad()
def stagewise_lr_scales(plan: GrowthPlan, new_model, read_old_lr_scale=None) -> dict[str, torch.Tensor]:
    """Per-element lr multipliers after a growth: old elements keep theirs (read through the plan from
    ``read_old_lr_scale(name)``, default 1), fresh elements of each tensor get ||W_fresh||_F / ||W_old||_F of
    that tensor in ``new_model`` (1 where either norm is 0, e.g. zero-initialised pieces)."""
    out: dict[str, torch.Tensor] = {}
    params = dict(new_model.named_parameters())
    for name, pp in plan.targets.items():
        p = params[name]
        if any(piece.is_fresh for piece in pp.pieces):
            fresh = pp.materialize(lambda n: None, "fresh", device=p.device, dtype=torch.float32).bool()
        else:
            fresh = None
        if read_old_lr_scale is None:
            scale = torch.ones_like(p, dtype=torch.float32)
        else:
            scale = pp.materialize(read_old_lr_scale, "lr_scale", device=p.device, dtype=torch.float32)
        if fresh is not None and bool(fresh.any()) and bool((~fresh).any()):
            w = p.detach().float()
            n_new, n_old = w[fresh].norm(), w[~fresh].norm()
            if n_new > 0 and n_old > 0:
                scale[fresh] = float(n_new / n_old)
        out[name] = scale
    return out


@torch.no_grad()
def new_elements(plan: GrowthPlan) -> dict[str, torch.Tensor]:
    """Which elements of the grown model are new, per target with any (bool tensors; targets without new
    elements are left out). New: fresh (random, zero, constant) elements, and every copy of an old element after
    its first one, in target order (``stack``'s second repeat of layer 0, Net2Net's duplicated units): the first
    copy continues the old element, the others are additions. Targets built by linear maps (a fitted learned
    plan) mix old elements and have none."""
    out: dict[str, torch.Tensor] = {}
    shapes = param_shapes(plan.old_cfg)
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += math.prod(shape)
    if total >= 2 ** 53:
        raise ValueError("new_elements: too many old elements to number exactly in float64")

    def ids(name: str) -> torch.Tensor:  # every old element's own number, copied through the plan like an age
        return torch.arange(offsets[name], offsets[name] + math.prod(shapes[name]),
                            dtype=torch.float64).reshape(shapes[name])

    seen = torch.zeros(total, dtype=torch.bool)
    for name, pp in plan.targets.items():
        if any(piece.is_linear for piece in pp.pieces):
            continue
        fresh = pp.materialize(lambda n: None, "fresh", dtype=torch.float32).bool()
        src = pp.materialize(ids, "age", dtype=torch.float64).long()
        new = fresh.clone()
        flat_src, flat_new = src.reshape(-1), new.reshape(-1)
        old = ~fresh.reshape(-1)
        order = flat_src[old]
        # an element is a repeat if its source was seen in an earlier target or earlier in this one
        first = torch.zeros_like(order, dtype=torch.bool)
        uniq, inverse = torch.unique(order, return_inverse=True)
        first_pos = torch.full((len(uniq),), len(order), dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(len(order)), reduce="amin")
        first[first_pos] = True
        repeat = ~first | seen[order]
        flat_new[old] = repeat
        seen[order] = True
        if bool(new.any()):
            out[name] = new
    return out
