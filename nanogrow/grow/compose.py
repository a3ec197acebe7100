"""Composition of growth plans: ``compose(a, b)`` is one plan doing a then b (b's sources are a's targets).
Gathers of gathers are gathers, gathers of Fresh stay Fresh with the same seed, masks follow their units; a joint
depth + width growth is one composed plan."""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from nanogrow.grow.plan import Fresh, GrowthPlan, Index, ParamPlan, Piece, arange_index
from nanogrow.grow.schema import mask_shapes, param_shapes, shape_dict
from nanogrow.model import ModelConfig

def _full(ix: Index | None, n: int) -> Index:
    return arange_index(n) if ix is None else ix


def _simplify(ix_dst: Index, ix_src: Index, n_dst: int, n_src: int):
    if n_dst == n_src and len(ix_dst) == n_dst and torch.equal(ix_dst, arange_index(n_dst)) and \
            torch.equal(ix_src, arange_index(n_src)):
        return None, None
    return ix_dst, ix_src


def _compose_piece(pb: Piece, a_plan: ParamPlan, b_shape, a_shapes_src) -> list[Piece]:
    """Pieces of (b-piece reading a-target) expressed on a's sources."""
    out = []
    n = len(b_shape)
    s_shape = a_plan.shape
    for pa in a_plan.pieces:
        if pa.add and pb.add:
            continue
        src_shape = pa.source.shape if pa.is_fresh else a_shapes_src[pa.source]
        dsts, srcs, scales = [], [], []
        empty = False
        for d in range(n):
            b_src = _full(pb.src[d], s_shape[d])
            b_dst = _full(pb.dst[d], b_shape[d])
            a_dst = _full(pa.dst[d], s_shape[d])
            a_src = _full(pa.src[d], src_shape[d])
            inv = torch.full((s_shape[d],), -1, dtype=torch.long)
            inv[a_dst] = arange_index(len(a_dst))
            j = inv[b_src]
            sel = j >= 0
            if not bool(sel.any()):
                empty = True
                break
            jj = j[sel]
            nd, ns = b_dst[sel], a_src[jj]
            sc = None
            if pb.dim_scales[d] is not None or pa.dim_scales[d] is not None:
                sc = torch.ones(len(nd), dtype=torch.float64)
                if pb.dim_scales[d] is not None:
                    sc = sc * pb.dim_scales[d][sel]
                if pa.dim_scales[d] is not None:
                    sc = sc * pa.dim_scales[d][jj]
            if sc is None:
                nd, ns = _simplify(nd, ns, b_shape[d], src_shape[d])
            dsts.append(nd), srcs.append(ns), scales.append(sc)
        if empty:
            continue
        out.append(Piece(pa.source, tuple(dsts), tuple(srcs), pb.scale * pa.scale, tuple(scales),
                         add=pa.add or pb.add))
    return out


_ANCHORS = (  # mask buffer -> (parameter whose unit index it shares, dim, stride per mask element)
    (re.compile(r"^(layers\.\d+)\.mlp\.unit_mask$"), "mlp.w_down.weight", 1),
    (re.compile(r"^(layers\.\d+)\.attn\.head_mask$"), "attn.wo.weight", 1),
    (re.compile(r"^(layers\.\d+)\.block_mask$"), "attn_norm.weight", None),
)


def _anchor(mask_name: str, cfg: ModelConfig):
    if mask_name == "resid_mask":
        return "norm.weight", 0, 1
    for pat, suffix, dim in _ANCHORS:
        m = pat.match(mask_name)
        if m:
            stride = cfg.head_dim if suffix == "attn.wo.weight" else 1
            return f"{m.group(1)}.{suffix}", dim, stride
    raise KeyError(mask_name)


def _mask_for_param(param_name: str, mask_kind: str) -> str:
    m = re.match(r"^(layers\.\d+)\.", param_name)
    if mask_kind == "resid_mask":
        return "resid_mask"
    return f"{m.group(1)}.{mask_kind}" if m else ""


def _carry_masks(a: GrowthPlan, b: GrowthPlan) -> dict[str, torch.Tensor]:
    """a's fading masks expressed in b's target space, following the units they mask through b's pieces."""
    out: dict[str, torch.Tensor] = {}
    if not a.masks:
        return out
    for name, shape in mask_shapes(b.new_cfg).items():
        anchor, dim, stride = _anchor(name, b.new_cfg)
        kind = re.sub(r"^layers\.\d+\.", "", name)  # "attn.head_mask", "mlp.unit_mask", "block_mask", "resid_mask"
        pp = b.targets[anchor]
        if dim is None:  # block mask: follows the layer its norm gain came from
            src = pp.primary_source
            src_mask = _mask_for_param(src, kind) if src else None
            if src_mask in a.masks and bool(a.masks[src_mask]):
                out[name] = torch.tensor(True)
            continue
        fading = torch.zeros(shape, dtype=torch.bool)
        n_units = shape[0]
        for p in pp.pieces:
            if p.is_fresh or p.add:
                continue
            src_mask = _mask_for_param(p.source, kind)
            if src_mask not in a.masks:
                continue
            a_anchor, _, a_stride = _anchor(src_mask, a.new_cfg)
            dst = _full(p.dst[dim], pp.shape[dim])
            srcix = _full(p.src[dim], a.targets[p.source].shape[dim])
            fading[dst // stride] |= a.masks[src_mask][srcix // a_stride]
        if bool(fading.any()):
            assert fading.numel() == n_units
            out[name] = fading
    return out


def compose(a: GrowthPlan, b: GrowthPlan) -> GrowthPlan:
    """One plan equal to applying ``a`` then ``b`` (b's sources are a's targets): same weights, moments, ages,
    lr scales and masks as the two applied in sequence, but each parameter built in one pass from the old one."""
    if shape_dict(b.old_cfg) != shape_dict(a.new_cfg) or b.old_cfg.norm_eps != a.new_cfg.norm_eps:
        raise ValueError(f"compose(a, b): b grows from {shape_dict(b.old_cfg)} but a grows to "
                         f"{shape_dict(a.new_cfg)}")
    if a.masks and b.masks and a.fade_steps != b.fade_steps:
        raise ValueError(f"compose(a, b): both plans fade masks in but over different lengths "
                         f"({a.fade_steps} and {b.fade_steps} steps); use one fade_steps")
    if any(p.is_linear for plan in (a, b) for pp in plan.targets.values() for p in pp.pieces):
        raise ValueError("compose(a, b): a learned plan (linear pieces) does not compose with other plans; the "
                         "learned operator grows depth and width in one plan itself")
    old_shapes = param_shapes(a.old_cfg)
    like_map: dict[int, Fresh] = {}

    def remap_like(f: Fresh) -> Fresh:
        if f.like is None or f.like not in a.targets:
            return f
        if id(f) not in like_map:  # one replacement per Fresh, so +W/-W twins keep sharing it
            like_map[id(f)] = replace(f, like=a.targets[f.like].primary_source)
        return like_map[id(f)]

    targets: dict[str, ParamPlan] = {}
    for name, pb in b.targets.items():
        pieces: list[Piece] = []
        for p in pb.pieces:
            if p.is_fresh:
                pieces.append(Piece(remap_like(p.source), p.dst, p.src, p.scale, p.dim_scales, p.add))
            else:
                pieces.extend(_compose_piece(p, a.targets[p.source], pb.shape, old_shapes))
        targets[name] = ParamPlan(name, pb.shape, pieces)
    masks = _carry_masks(a, b)
    for k, m in b.masks.items():
        masks[k] = masks[k] | m if k in masks else m.clone()
    masks = {k: masks[k] for k in mask_shapes(b.new_cfg) if k in masks}
    parts = (a.parts if a.op == "compose" else [a]) + (b.parts if b.op == "compose" else [b])
    return GrowthPlan("compose", {}, a.old_cfg, b.new_cfg, a.seed, targets, masks,
                      max(a.fade_steps if a.masks else 0, b.fade_steps if b.masks else 0), parts)
