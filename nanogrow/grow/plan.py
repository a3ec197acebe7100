"""GrowthPlan: a pure description of how every parameter of a grown model is made from the old one.

An operator (``depth.py``, ``width.py``) looks only at the old and new ``ModelConfig`` and returns a plan; no
tensor is touched. The plan is then applied, ONE PARAMETER AT A TIME, to whatever holds the tensors: full
tensors on one process (``execute.apply_to_model``, ``optim.transfer_optimizer_state``), or DTensor / ZeRO
partitions (``nanogrow.parallel``), which only need ``plan.targets[name].sources`` and ``materialize``.

Vocabulary
----------
* A target parameter (``ParamPlan``) is written by a list of ``Piece``s. A piece copies a sub-block of a
  *source* into a sub-block of the target: per dimension an index map (``dst[d][k]`` in the target is fed by
  ``src[d][k]`` of the source; ``None`` = the whole dimension, unchanged), times a scale (a scalar times, per
  dimension, a per-index multiplier).
* A source is either an old parameter (by name) or a ``Fresh`` tensor made from nothing: zeros, a constant, or a
  normal draw whose generator is seeded from (plan seed, target name, a tag). Two pieces that read the same
  ``Fresh`` with scales +1 and -1 make a +W/-W pair from one random draw. Because every draw has its own seed,
  the same plan gives the same tensors on every process and in any application order.
* The same pieces apply to every kind of per-element state (``KINDS``):
  ``param`` and ``exp_avg`` take the gather times the scale, ``exp_avg_sq`` the gather times the SQUARED scale,
  ``age`` (steps trained) and ``lr_scale`` (per-element learning-rate multiplier) are copied unscaled. A
  ``Fresh`` source gives for the optimizer kinds its policy value (``zero`` or ``mean-of-source``: the mean of
  that moment over an old tensor), age 0 and its ``lr_scale``. ``fresh`` is a diagnostic kind: 1 where an
  element comes from a Fresh piece, 0 where it was gathered.
* ``add`` pieces are added on top (only to the weights): Net2Net's symmetry-breaking noise is a +eps/-eps pair
  added to the two halves of a split unit, which keeps their sum, hence the function.
* Masks (MSG-style fade-in, Yao et al. 2024): the plan lists the mask buffers the grown model gets and which of
  their elements are new (fading 0 -> 1 over ``fade_steps``); ``MaskRamp`` is the small checkpointable state
  that gives mask values at a step and removes the masks when the ramp ends.

* ``LinearPiece`` (learned operators, ``learned.py``): a target that is a dense linear function of old tensors,
  target = sum over pieces of coef * L @ source @ R^T (L, R: expansion matrices, optionally Kronecker-expanded over
  blocks such as attention heads; None = identity). A ParamPlan is made either of gather pieces or of linear
  pieces. Moments: ``exp_avg`` maps like the weights; ``exp_avg_sq`` by the element-wise squared coefficients
  (coef^2 * (L*L) @ v @ (R*R)^T: Adam keeps only the diagonal of the gradient covariance, so the cross terms are
  unknown and taken as zero; for a map with one non-zero per row, i.e. any gather, this is exactly the gather's
  scale**2 rule); ``age`` and ``lr_scale`` are the |coefficient|-weighted means of the contributing old elements
  (again a plain copy for a gather-like map; an element no old element contributes to gets age 0, lr_scale 1).

Plans compose (``compose.py``). Around this core: ``schema.py`` (the model's parameter shapes and the shape
checks), ``fade.py`` (the fade-in ramp at run time), ``execute.py`` (applying a plan: the checks and mask values
every executor shares, the one-process executor), ``testing.py`` (``check_plan``: the full consistency check).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from nanogrow.grow.fade import MaskRamp, index_runs
from nanogrow.grow.schema import SHAPE_FIELDS, param_shapes
from nanogrow.model import ModelConfig

KINDS = ("param", "exp_avg", "exp_avg_sq", "age", "lr_scale", "fresh")
STATE_POLICIES = ("zero", "mean-of-source")

# ----------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Fresh:
    """A source tensor made from nothing. ``shape`` is the shape of the draw (pieces gather from it)."""

    shape: tuple[int, ...]
    init: str = "zeros"  # "zeros" | "const" | "normal"
    std: float = 0.0  # normal
    value: float = 0.0  # const
    seed: int = 0  # normal: the draw's generator seed
    state: str = "zero"  # optimizer moments of these elements: "zero" | "mean-of-source"
    like: str | None = None  # old parameter whose moment mean "mean-of-source" uses
    lr_scale: float = 1.0

    def __post_init__(self):
        if self.init not in ("zeros", "const", "normal"):
            raise ValueError(f"Fresh.init must be zeros, const or normal, got {self.init!r}")
        if self.state not in STATE_POLICIES:
            raise ValueError(f"Fresh.state must be one of {STATE_POLICIES}, got {self.state!r}")

    def make(self, kind: str, read: Callable[[str], torch.Tensor] | None, device, dtype) -> torch.Tensor:
        if kind == "param":
            if self.init == "normal":
                # Drawn on CPU in fp32 from its own generator: identical bits everywhere, whatever the device.
                gen = torch.Generator(device="cpu").manual_seed(self.seed)
                t = torch.randn(self.shape, generator=gen, dtype=torch.float32) * self.std
            elif self.init == "const":
                t = torch.full(self.shape, float(self.value), dtype=torch.float32)
            else:
                t = torch.zeros(self.shape, dtype=torch.float32)
            return t.to(device=device, dtype=dtype)
        if kind in ("exp_avg", "exp_avg_sq"):
            if self.state == "mean-of-source" and self.like is not None and read is not None:
                return torch.full(self.shape, float(read(self.like).float().mean()), device=device, dtype=dtype)
            return torch.zeros(self.shape, device=device, dtype=dtype)
        if kind == "age":
            return torch.zeros(self.shape, device=device, dtype=dtype)
        if kind == "lr_scale":
            return torch.full(self.shape, float(self.lr_scale), device=device, dtype=dtype)
        if kind == "fresh":
            return torch.ones(self.shape, device=device, dtype=dtype)
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")

    def describe(self) -> str:
        s = {"zeros": "zeros", "const": f"const {self.value:.4g}", "normal": f"normal(std={self.std:.3g})"}
        return s[self.init]


Index = torch.Tensor  # 1-D int64 on CPU


def arange_index(n: int) -> Index:
    """The identity index 0..n-1 (long), as pieces store them."""
    return torch.arange(n, dtype=torch.long)


def _as_index(x) -> Index | None:
    if x is None:
        return None
    return torch.as_tensor(x, dtype=torch.long).reshape(-1)


@dataclass(eq=False)
class Piece:
    """target[dst] = source[src] * scale (or += for ``add`` pieces).

    ``dst[d]``/``src[d]``: 1-D index tensors of equal length, or both None (whole dimension, unchanged).
    ``dim_scales[d]``: None or a float64 multiplier per position of ``dst[d]``.
    """

    source: str | Fresh
    dst: tuple[Index | None, ...]
    src: tuple[Index | None, ...]
    scale: float = 1.0
    dim_scales: tuple[torch.Tensor | None, ...] = ()
    add: bool = False

    def __post_init__(self):
        self.dst = tuple(_as_index(x) for x in self.dst)
        self.src = tuple(_as_index(x) for x in self.src)
        if not self.dim_scales:
            self.dim_scales = (None,) * len(self.dst)
        self.dim_scales = tuple(None if s is None else torch.as_tensor(s, dtype=torch.float64).reshape(-1)
                                for s in self.dim_scales)
        if not (len(self.dst) == len(self.src) == len(self.dim_scales)):
            raise ValueError("Piece: dst, src and dim_scales need one entry per dimension")
        for d, (a, b) in enumerate(zip(self.dst, self.src)):
            if (a is None) != (b is None) or (a is not None and len(a) != len(b)):
                raise ValueError(f"Piece: dst and src index maps of dim {d} differ in length")
            s = self.dim_scales[d]
            if s is not None and (a is None or len(s) != len(a)):
                raise ValueError(f"Piece: dim_scales of dim {d} must align with an explicit dst index map")

    @property
    def is_fresh(self) -> bool:
        return isinstance(self.source, Fresh)

    is_linear = False

    def scale_tensor(self, power: int, like: torch.Tensor) -> torch.Tensor | float:
        """The per-element multiplier (scale * outer(dim_scales)) ** power, broadcastable to the block."""
        total: torch.Tensor | float = float(self.scale) ** power
        n = len(self.dst)
        for d, s in enumerate(self.dim_scales):
            if s is None:
                continue
            shape = [1] * n
            shape[d] = -1
            total = total * (s ** power).view(shape)
        if isinstance(total, torch.Tensor):
            return total.to(device=like.device, dtype=like.dtype)
        return total


def copy_piece(name: str, ndim: int) -> Piece:
    """The whole source, unchanged."""
    return Piece(name, (None,) * ndim, (None,) * ndim)


def _kron_left(m: torch.Tensor, t: torch.Tensor, block: int) -> torch.Tensor:
    """(m kron I_block) @ t, without building the Kronecker product: t's rows come in groups of ``block``."""
    if block == 1:
        return m @ t
    rest = t.shape[1:]
    u = t.reshape(m.shape[1], block, -1)
    return torch.einsum("ab,bkr->akr", m, u).reshape(m.shape[0] * block, *rest)


def _kron_right(t: torch.Tensor, m: torch.Tensor, block: int) -> torch.Tensor:
    """t @ (m kron I_block)^T for a matrix t whose columns come in groups of ``block``."""
    if block == 1:
        return t @ m.t()
    u = t.reshape(t.shape[0], m.shape[1], block)
    return torch.einsum("rbk,ab->rak", u, m).reshape(t.shape[0], m.shape[0] * block)


@dataclass(eq=False)
class LinearPiece:
    """target += coef * (left kron I_left_block) @ source @ (right kron I_right_block)^T.

    ``left`` (n_out_new x n_out_old, blocks) maps dim 0, ``right`` (n_in_new x n_in_old, blocks) maps dim 1 of a
    matrix; None = identity. A 1-D source (a norm gain) takes only ``left``. ``coef`` is a float or a 0-d tensor
    (a learned depth coefficient; tensors may carry autograd, which is how ``learned.py`` fits its maps through
    ``ParamPlan.materialize`` itself)."""

    source: str
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    coef: torch.Tensor | float = 1.0
    left_block: int = 1
    right_block: int = 1

    is_fresh = False
    is_linear = True
    add = False

    def apply(self, t: torch.Tensor, power: int = 1, absolute: bool = False) -> torch.Tensor:
        """The piece's contribution from ``t`` with every coefficient raised to ``power`` (``absolute``: of its
        absolute value)."""
        def f(x):
            if x is None or isinstance(x, float):
                return x
            x = x.to(device=t.device, dtype=t.dtype)
            x = x.abs() if absolute else x
            return x if power == 1 else x ** power

        c, left, right = f(self.coef), f(self.left), f(self.right)
        if isinstance(c, float):
            c = abs(c) ** power if absolute else c ** power
        if left is not None:
            t = _kron_left(left, t, self.left_block)
        if right is not None:
            t = _kron_right(t, right, self.right_block)
        return t * c

    def out_shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        s = list(source_shape)
        if self.left is not None:
            s[0] = self.left.shape[0] * self.left_block
        if self.right is not None:
            s[1] = self.right.shape[0] * self.right_block
        return tuple(s)

    def flops(self, source_shape: tuple[int, ...]) -> float:
        """Multiply-add FLOPs (2 per MAC) of one application to a source of this shape."""
        rows, cols = source_shape[0], math.prod(source_shape[1:])
        total = 0.0
        if self.left is not None:
            total += 2.0 * self.left.shape[0] * self.left.shape[1] * self.left_block * cols
            rows = self.left.shape[0] * self.left_block
        if self.right is not None:
            total += 2.0 * rows * self.right.shape[0] * self.right.shape[1] * self.right_block
        return total + float(rows * cols)


def piece_block_shape(piece: Piece, target_shape: tuple[int, ...], source_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the block a piece reads from its source (and writes into the target)."""
    return tuple(source_shape[d] if piece.src[d] is None else len(piece.src[d]) for d in range(len(target_shape)))


def _gather(t: torch.Tensor, src: tuple[Index | None, ...]) -> torch.Tensor:
    for d, ix in enumerate(src):
        if ix is not None:
            t = t.index_select(d, ix.to(t.device))
    return t


def write_piece(out: torch.Tensor, dst: tuple[Index | None, ...], vals: torch.Tensor, add: bool) -> None:
    """Write (or with ``add``, accumulate) a piece's values into ``out`` at its destination indices."""
    adv = [d for d, ix in enumerate(dst) if ix is not None]
    if not adv:
        out.add_(vals) if add else out.copy_(vals)
    elif len(adv) == 1:
        d = adv[0]
        ix = dst[d].to(out.device)
        out.index_add_(d, ix, vals) if add else out.index_copy_(d, ix, vals)
    else:
        n = out.dim()
        idx = []
        for d in range(n):
            ix = dst[d] if dst[d] is not None else arange_index(out.shape[d])
            shape = [1] * n
            shape[d] = -1
            idx.append(ix.to(out.device).view(shape))
        out.index_put_(tuple(idx), vals.expand(torch.broadcast_shapes(*[i.shape for i in idx])), accumulate=add)


# ----------------------------------------------------------------------------------------------------------
# ParamPlan
# ----------------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class ParamPlan:
    """How one target parameter is made. Apply it alone: ``materialize(read, kind)``."""

    name: str
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        """Names of old parameters this target reads (gathers, and ``mean-of-source`` references)."""
        out: list[str] = []
        for p in self.pieces:
            n = p.source.like if isinstance(p.source, Fresh) else p.source
            if isinstance(p.source, Fresh) and p.source.state != "mean-of-source":
                n = None
            if n is not None and n not in out:
                out.append(n)
        return out

    @property
    def primary_source(self) -> str | None:
        """The first gathered old parameter (the one whose param group / hyper-parameters the target inherits)."""
        for p in self.pieces:
            if not p.is_fresh:
                return p.source
        return None

    @property
    def copies_whole(self) -> str | None:
        """Source name if this target is an unchanged copy of one old parameter, else None."""
        if len(self.pieces) == 1:
            p = self.pieces[0]
            if not p.is_fresh and not p.is_linear and not p.add and p.scale == 1.0 and all(x is None for x in p.dst):
                return p.source
        return None

    def materialize(self, read: Callable[[str], torch.Tensor], kind: str = "param", *,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Build this target for ``kind`` from ``read(old_name) -> tensor of that kind``.

        Only ``self.sources`` are read. Weights and first moments take gather * scale, second moments gather *
        scale**2, ages and lr scales are copied; Fresh pieces give their policy value (see module docstring).
        ``device``/``dtype`` default to those of the first tensor read (else CPU fp32).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        cache: dict[int, torch.Tensor] = {}
        reads: dict[str, torch.Tensor] = {}

        def rd(name: str) -> torch.Tensor:
            if name not in reads:
                reads[name] = read(name)
            return reads[name]

        if device is None or dtype is None:
            first = next((p.source for p in self.pieces if not p.is_fresh), None)
            if first is not None and kind != "fresh":
                t = rd(first)
                device = t.device if device is None else device
                dtype = t.dtype if dtype is None else dtype
        device = torch.device("cpu") if device is None else torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        if any(p.is_linear for p in self.pieces):
            return self._materialize_linear(rd, kind, device, dtype)
        out = torch.zeros(self.shape, device=device, dtype=dtype)
        power = {"param": 1, "exp_avg": 1, "exp_avg_sq": 2}.get(kind, 0)
        # Set-pieces first, then additive ones (Net2Net noise) on top; additive pieces touch only the weights.
        for p in sorted(self.pieces, key=lambda q: q.add):
            if p.add and kind != "param":
                continue
            if p.is_fresh:
                key = id(p.source)
                if key not in cache:
                    cache[key] = p.source.make(kind, rd, device, dtype)
                src = cache[key]
            elif kind == "fresh":
                vals = torch.zeros(piece_block_shape(p, self.shape, self.shape), device=device, dtype=dtype)
                write_piece(out, p.dst, vals, p.add)
                continue
            else:
                src = rd(p.source)
            vals = _gather(src.to(device=device, dtype=dtype), p.src)
            if power:
                s = p.scale_tensor(power, vals)
                if not (isinstance(s, float) and s == 1.0):
                    vals = vals * s
            write_piece(out, p.dst, vals, p.add)
        return out

    def _materialize_linear(self, rd, kind: str, device, dtype) -> torch.Tensor:
        """A sum of LinearPieces (see the module docstring for the per-kind rules). Out-of-place, so autograd
        flows into tensor coefficients and maps."""
        if not all(p.is_linear for p in self.pieces):
            raise ValueError(f"{self.name}: linear pieces cannot be mixed with gather pieces in one target")
        if kind == "fresh":
            return torch.zeros(self.shape, device=device, dtype=dtype)
        if kind in ("param", "exp_avg", "exp_avg_sq"):
            power = 2 if kind == "exp_avg_sq" else 1
            terms = [p.apply(rd(p.source).to(device=device, dtype=dtype), power) for p in self.pieces]
            return functools.reduce(torch.add, terms)
        # age, lr_scale: |coefficient|-weighted mean of the contributing old elements.
        num = functools.reduce(torch.add, [p.apply(rd(p.source).to(device=device, dtype=dtype), absolute=True)
                                           for p in self.pieces])
        den = functools.reduce(torch.add, [p.apply(torch.ones_like(rd(p.source), device=device, dtype=dtype),
                                                   absolute=True) for p in self.pieces])
        empty = 0.0 if kind == "age" else 1.0
        return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(num, empty))


# ----------------------------------------------------------------------------------------------------------
# GrowthPlan
# ----------------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class GrowthPlan:
    op: str
    options: dict
    old_cfg: ModelConfig
    new_cfg: ModelConfig
    seed: int
    targets: dict[str, ParamPlan]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # buffer name -> bool "fading" tensor
    fade_steps: int = 0
    parts: list["GrowthPlan"] = field(default_factory=list)  # for compositions
    notes: list[str] = field(default_factory=list)  # operator remarks for describe()

    # --- introspection --------------------------------------------------------------------------------------
    def describe(self) -> str:
        o, n = self.old_cfg, self.new_cfg
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "parts")
        lines = [f"growth plan: {self.op}({opts}) seed={self.seed}"]
        for k in SHAPE_FIELDS:
            a, b = getattr(o, k), getattr(n, k)
            if a != b:
                lines.append(f"  {k}: {a} -> {b}")
        if n.norm_eps != o.norm_eps:
            lines.append(f"  norm_eps: {o.norm_eps:g} -> {n.norm_eps:g}")
        layer_src = []
        for i in range(n.n_layer):
            src = self.targets[f"layers.{i}.attn_norm.weight"].primary_source
            m = re.match(r"layers\.(\d+)\.", src) if src else None
            wo = self.targets[f"layers.{i}.attn.wo.weight"].pieces
            if all(p.is_fresh and p.source.init == "zeros" for p in wo):  # identity block
                layer_src.append(f"id({m.group(1)})" if m else "id")
            else:
                layer_src.append(m.group(1) if m else "new")
        if n.n_layer != o.n_layer:
            lines.append("  layers <- old: " + " ".join(f"{i}<-{s}" for i, s in enumerate(layer_src)))
        total = fresh = 0
        for pp in self.targets.values():
            total += math.prod(pp.shape)
            # Set-pieces never overlap, so fresh elements = sum of the fresh blocks' sizes (no tensors built).
            fresh += sum(math.prod(pp.shape[d] if p.dst[d] is None else len(p.dst[d]) for d in range(len(pp.shape)))
                         for p in pp.pieces if p.is_fresh and not p.add)
        lines.append(f"  params: {sum(math.prod(s) for s in param_shapes(o).values()):,} -> {total:,} "
                     f"({fresh:,} fresh elements, {total - fresh:,} gathered)")
        if self.masks:
            kinds = sorted({re.sub(r"layers\.\d+\.", "layers.*.", k) for k in self.masks})
            lines.append(f"  masks: {len(self.masks)} buffers ({', '.join(kinds)}) fading in over "
                         f"{self.fade_steps} steps")
        for note in self.notes:
            lines.append(f"  note: {note}")
        for p in self.parts:
            lines.extend("  | " + s for s in p.describe().splitlines())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able record for the growth history; ``registry.plan_from_dict`` rebuilds the identical plan."""
        d = {"op": self.op, "options": _jsonable(self.options), "seed": self.seed,
             "old": asdict(self.old_cfg), "new": asdict(self.new_cfg), "fade_steps": self.fade_steps}
        if self.parts:
            d["parts"] = [p.to_dict() for p in self.parts]
        json.dumps(d)  # fail here, not in the checkpoint writer
        return d

    # --- masks ----------------------------------------------------------------------------------------------
    def mask_ramp(self, start_step: int) -> MaskRamp | None:
        """The fade-in state to keep (and checkpoint) from the growth step on; None when nothing fades."""
        if not self.masks:
            return None
        specs = {name: {"shape": list(m.shape), "fading": index_runs(m.reshape(-1).nonzero().flatten())}
                 for name, m in self.masks.items()}
        return MaskRamp(int(start_step), int(self.fade_steps), specs)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, ModelConfig):
        return asdict(x)
    return x


def identity_targets(cfg: ModelConfig) -> dict[str, ParamPlan]:
    """Every parameter copied unchanged (the starting point operators modify)."""
    return {n: ParamPlan(n, s, [copy_piece(n, len(s))]) for n, s in param_shapes(cfg).items()}
