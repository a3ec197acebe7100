"""Growth of a parallelised model, in place, mid-run, including the optimizer state.

FSDP2 (``grow_sharded``): the GrowthPlan is applied ONE BLOCK AT A TIME to DTensors; the whole model is never
gathered on one rank. For every target parameter of the grown model (and every kind of optimizer state):

* a target that is a whole, unchanged copy of one old parameter (``ParamPlan.copies_whole``) with the same
  sharding is copied shard to shard: the old local shard IS the new local shard, no communication;
* any other target gathers just the sources it reads (the sources of a block's targets, of one kind, in one
  all-gather: ``_gather_many``; a collective every rank makes in the same order, since the plan is the same
  everywhere), is built by the same ``ParamPlan.materialize`` as the one-process path (one source of truth),
  and each rank keeps its own slice of the result.

Peak extra memory is therefore one block's sources (of one kind at a time for the weights, of the four optimizer
kinds together for the state) in full, not the model. The new model is built on the
meta device with the new config, sharded exactly as ``parallelize`` does, ``to_empty``, then each local shard is
filled. Growth masks are plain (replicated) buffers, computed identically on every rank.

DDP (``grow_ddp``): every rank holds the full model, so it is unwrapped, grown by ``nanogrow.grow.grow`` and
rewrapped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from nanogrow.grow.execute import build_grown_model, check_model
from nanogrow.grow.optim import POLICIES, global_step, grow, grown_optimizer, missing_state
from nanogrow.model import Transformer

from .backends import apply_fsdp, backend_of, fsdp_mesh, parallelize, reshard

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from nanogrow.grow.plan import GrowthPlan, ParamPlan


def grow_parallel(model: nn.Module, optimizer: torch.optim.Optimizer, plan: GrowthPlan, policy: str = "map+age",
                  device: torch.device | str | None = None, lr_adapt: str | None = None,
                  **new_scales: float | bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Grow whatever backend ``model`` runs under (none, DDP, FSDP2); returns (new_model, new_optimizer).
    ``new_scales``: ``new_lr_mult`` / ``new_wd_hold`` of ``transfer_optimizer_state`` (not under FSDP2 yet)."""
    backend = backend_of(model)
    if backend == "fsdp":
        if new_scales.get("new_lr_mult", 1.0) != 1.0 or new_scales.get("new_wd_hold", False):
            raise NotImplementedError("grow_sharded: new_lr_mult / new_wd_steps need full tensors (not yet)")
        return grow_sharded(model, optimizer, plan, policy=policy, lr_adapt=lr_adapt)
    if backend == "ddp":
        return grow_ddp(model, optimizer, plan, policy=policy, device=device, lr_adapt=lr_adapt, **new_scales)
    return grow(model, optimizer, plan, policy=policy, device=device, lr_adapt=lr_adapt, **new_scales)


def grow_ddp(model: nn.Module, optimizer: torch.optim.Optimizer, plan: GrowthPlan, policy: str = "map+age",
             device: torch.device | str | None = None, lr_adapt: str | None = None,
             **new_scales: float | bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """DDP: unwrap, grow the full (replicated) tensors with ``grow()``, rewrap. Every rank computes the same."""
    new_model, new_opt = grow(model.module, optimizer, plan, policy=policy, device=device, lr_adapt=lr_adapt,
                              **new_scales)
    return parallelize(new_model, "ddp"), new_opt


# ----------------------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------------------

def _local_slice(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's part of ``full`` when laid out like the DTensor ``like`` (no communication: every rank holds
    the same ``full`` and keeps its own chunk)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _same_layout(a, b) -> bool:
    return a.shape == b.shape and a.placements == b.placements and a.device_mesh == b.device_mesh


def _mp_enabled(model: nn.Module) -> bool:
    """Did ``parallelize`` give this FSDP2 model a bf16 mixed-precision policy?"""
    try:
        from torch.distributed.fsdp import fully_shard
        return fully_shard.state(model)._mp_policy.param_dtype is not None
    except Exception:  # private API moved: assume fp32 (the CPU default)
        return False


def _gather_many(tensors: list) -> list[torch.Tensor]:
    """``[t.full_tensor() for t in tensors]`` in ONE all-gather when they are all sharded ``Shard(0)`` on the same
    1-D mesh with one dtype (FSDP2's layout): each rank pads its local rows to the chunk size (``torch.chunk``
    semantics, as DTensor shards), the pieces are concatenated, gathered, and cut back into full tensors. A
    growth event that reshapes every tensor so makes one collective per block and kind instead of one per
    tensor (~2 ms each on gloo). Other layouts (HSDP's 2-D mesh) fall back to one ``full_tensor`` per tensor."""

    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    mesh = tensors[0].device_mesh
    if (mesh.ndim != 1 or len(tensors) == 1 or
            any(t.device_mesh != mesh or tuple(t.placements) != (Shard(0),) or t.dtype != tensors[0].dtype
                or t.dim() == 0 for t in tensors)):
        return [t.full_tensor() for t in tensors]
    world = mesh.size()
    layout, pieces = [], []
    for t in tensors:
        rows, row = t.shape[0], math.prod(t.shape[1:])
        chunk = -(-rows // world)
        local = t.to_local().reshape(-1)
        padded = local.new_zeros(chunk * row)
        padded[:local.numel()] = local
        pieces.append(padded)
        layout.append((t.shape, chunk * row))
    flat = torch.cat(pieces)
    out = flat.new_empty(world * flat.numel())
    dist.all_gather_into_tensor(out, flat, group=mesh.get_group())
    out = out.view(world, -1)
    fulls, offset = [], 0
    for shape, size in layout:
        block = out[:, offset:offset + size].reshape(-1, *shape[1:])[:shape[0]]
        fulls.append(block.contiguous())
        offset += size
    return fulls


def _blocks(names) -> list[list[str]]:
    """Parameter names grouped by block (``layers.<i>.``), other parameters one group each, in order."""
    groups: dict[str, list[str]] = {}
    for n in names:
        key = ".".join(n.split(".")[:2]) if n.startswith("layers.") else n
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def _needs_gather(pp, like, old_params: dict) -> bool:
    src = pp.copies_whole
    return src is None or not _same_layout(old_params[src], like)


class _OldState:
    """Reads old tensors of one kind: parameters or optimizer state, as DTensors; a missing state means what
    ``optim.missing_state`` says, as for the one-process reader."""

    def __init__(self, params: dict, optimizer, kind: str):
        self.params, self.opt, self.kind = params, optimizer, kind
        self.cache: dict[str, torch.Tensor] = {}  # full tensors gathered ahead by ``prefetch``

    def prefetch(self, names) -> None:
        """Gather the full tensors of ``names`` (those not cached, and not implicit) in one collective."""
        names = [n for n in dict.fromkeys(names) if n not in self.cache and self.dtensor(n) is not None]
        if names:
            self.cache.update(zip(names, _gather_many([self.dtensor(n) for n in names])))

    def dtensor(self, name: str):
        """The old DTensor of this kind, or None when it is implicit (missing optimizer state)."""
        p = self.params[name]
        if self.kind == "param":
            return p
        st = self.opt.state.get(p, {}) if self.opt is not None else {}
        return st.get(self.kind)

    def default(self, name: str, shape, device) -> torch.Tensor:
        p = self.params[name]
        return missing_state(self.kind, p, self.opt.state.get(p, {}) if self.opt is not None else {}, shape, device)

    def full(self, name: str) -> torch.Tensor:
        if name in self.cache:
            return self.cache[name]
        t = self.dtensor(name)
        if t is None:
            p = self.params[name]
            return self.default(name, p.shape, p.to_local().device)
        return t.full_tensor()


def _local_target(pp: ParamPlan, like, old: _OldState, kind: str, dtype, stats: dict) -> torch.Tensor:
    """The local shard (laid out like DTensor ``like``) of target ``pp`` for ``kind``."""
    src = pp.copies_whole
    if src is not None:
        t = old.dtensor(src)
        ref = old.params[src]
        if _same_layout(ref, like):
            stats["shard_copies"] += 1
            if t is None:
                return old.default(src, like.to_local().shape, like.to_local().device)
            return t.to_local()
    stats["gathered"] += 1
    full = pp.materialize(old.full, kind, device=like.to_local().device, dtype=dtype)
    return _local_slice(full, like)


def _as_dtensor_like(like, local: torch.Tensor, dtype):
    t = torch.empty_like(like, dtype=dtype)
    with torch.no_grad():
        t.to_local().copy_(local)
    return t


def grow_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, plan: GrowthPlan, policy: str = "map+age",
                 lr_adapt: str | None = None, mixed_precision: bool | None = None, stats: dict | None = None,
                 mesh: DeviceMesh | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Grow an FSDP2 model (``parallelize(..., "fsdp")``) and its optimizer in place, sharded, one parameter at
    a time: returns (new_model, new_optimizer), the new model sharded on the same mesh like ``parallelize`` does
    (or on ``mesh``: every rank of both meshes calls it). Same result as ``nanogrow.grow.grow`` on one process
    (weights, moments, ages, lr scales, masks). A collective: every rank of the mesh calls it. ``stats``
    (optional dict) receives counts of shard copies and gathers."""
    if policy not in POLICIES:
        raise ValueError(f"unknown optimizer transfer policy {policy!r}; known: {', '.join(POLICIES)}")
    if lr_adapt is not None:
        raise NotImplementedError("grow_sharded: lr_adapt='vt' needs stagewise_lr_scales on DTensors (not yet)")
    if optimizer is not None:
        for g in optimizer.param_groups:
            if g.get("amsgrad") or g.get("maximize"):
                raise ValueError("grow: amsgrad / maximize param groups are not supported by nanogrow AdamW")
    reshard(model)  # after an eval forward under no_grad the root stays unsharded
    check_model(plan, model)
    stats = {} if stats is None else stats
    stats.update(shard_copies=0, gathered=0)
    mesh = fsdp_mesh(model) if mesh is None else mesh
    old_params = dict(model.named_parameters())
    device = next(iter(old_params.values())).to_local().device
    mp = _mp_enabled(model) if mixed_precision is None else mixed_precision

    def prefetch(r: _OldState, names: list[str], new_params: dict) -> None:  # one collective per block and kind
        r.cache.clear()
        r.prefetch([s for n in names if _needs_gather(plan.targets[n], new_params[n], old_params)
                    for s in plan.targets[n].sources])

    def fill(new_model: Transformer) -> None:
        new_params = dict(new_model.named_parameters())
        reader = _OldState(old_params, optimizer, "param")
        for names in _blocks(new_params):
            prefetch(reader, names, new_params)
            for name in names:
                p, pp = new_params[name], plan.targets[name]
                p.to_local().copy_(_local_target(pp, p, reader, "param", p.dtype, stats))
                src = pp.primary_source
                p.requires_grad_(old_params[src].requires_grad if src else True)
        reader.cache.clear()

    new_model = build_grown_model(plan, device, fill, model.training, shard=lambda m: apply_fsdp(m, mesh, mp))
    if optimizer is None:
        return new_model, None

    new_opt = grown_optimizer(model, optimizer, plan, new_model)
    if policy == "reset":
        return new_model, new_opt
    step = global_step(optimizer)
    new_params = dict(new_model.named_parameters())
    readers = {k: _OldState(old_params, optimizer, k) for k in ("exp_avg", "exp_avg_sq", "age", "lr_scale")}
    optional = []  # (param, state, name of the optional state, its DTensor, is it uniform on this rank)
    with torch.no_grad():
        for names in _blocks(new_params):
            for k in (("exp_avg", "exp_avg_sq", "age", "lr_scale") if policy == "map+age" else
                      ("exp_avg", "exp_avg_sq", "lr_scale")):
                prefetch(readers[k], names, new_params)
            for name in names:
                p, pp = new_params[name], plan.targets[name]
                st = {"step": torch.tensor(step, dtype=torch.float32)}
                for k in ("exp_avg", "exp_avg_sq"):
                    st[k] = _as_dtensor_like(p, _local_target(pp, p, readers[k], k, p.dtype, stats), p.dtype)
                if policy == "map+age":
                    age = _as_dtensor_like(p, _local_target(pp, p, readers["age"], "age", torch.float32, stats),
                                           torch.float32)
                    optional.append((p, st, "age", age, bool((age.to_local() == step).all())))
                lr_scale = _as_dtensor_like(p, _local_target(pp, p, readers["lr_scale"], "lr_scale",
                                                             torch.float32, stats), torch.float32)
                optional.append((p, st, "lr_scale", lr_scale, bool((lr_scale.to_local() == 1).all())))
                new_opt.state[p] = st
        for r in readers.values():
            r.cache.clear()
        # Optional per-element state is kept only where it is not uniform: a global decision (one all-reduce of
        # every rank's flags over the mesh), so every rank keeps or drops it alike and takes the same path.
        uniform = _all_ranks_agree([flag for *_, flag in optional], mesh)
        for (p, st, key, t, _), same in zip(optional, uniform):
            if not same:
                st[key] = t
    return new_model, new_opt


def _all_ranks_agree(flags: list[bool], mesh) -> list[bool]:
    """Element-wise AND of ``flags`` over every rank of ``mesh``, in one all-reduce."""
    import torch.distributed as dist

    if not flags:
        return []
    device = "cuda" if mesh.device_type == "cuda" else "cpu"
    t = torch.tensor([0 if f else 1 for f in flags], dtype=torch.int32, device=device)
    groups = [mesh.get_group(i) for i in range(mesh.ndim)]
    for g in groups:  # a 2-D (HSDP) mesh: over both dimensions
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)
    return [int(v) == 0 for v in t.tolist()]
