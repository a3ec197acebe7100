"""Process groups for LAG (issue: train one growth candidate per group of ranks, then keep the best).

    mesh = candidate_mesh(n_groups)        # 2-D ("candidate", "dp"): group g = ranks [g*dp, (g+1)*dp)
    g = candidate_index(mesh)              # which candidate this rank trains
    model = parallelize(model, "fsdp", mesh["dp"])        # or DDP / none inside the group
    losses = group_values(val_loss, mesh)  # [G] floats, the same on every rank (mean over each group's ranks)
    broadcast_group_state(winner, mesh, tensors)          # every group takes the winner's state
    model = replicate_in_group(model, mesh)                # DDP over one group's ranks (LAG in the trainer)
    model, opt = move_to_mesh(model, opt, mesh["dp"])     # an FSDP model re-sharded onto another mesh

The broadcast pairs rank (g, d) with rank (winner, d): local shards of a model sharded over "dp" line up, so
a sharded winner is copied shard by shard without gathering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
import torch.distributed as dist

from nanogrow.grow.fade import active_masks, set_buffer

from nanogrow.grow.plan import GrowthPlan, identity_targets

from .backends import device_type
from .sharded import grow_sharded

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def candidate_mesh(n_groups: int, device: str | None = None) -> DeviceMesh:
    """Split the world into ``n_groups`` equal groups: a 2-D DeviceMesh ("candidate", "dp")."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("candidate_mesh needs torch.distributed (launch with torchrun)")
    world = dist.get_world_size()
    if n_groups < 1 or world % n_groups:
        raise ValueError(f"n_groups={n_groups} must divide the world size {world}")
    return init_device_mesh(device or device_type(), (n_groups, world // n_groups),
                            mesh_dim_names=("candidate", "dp"))


def candidate_index(mesh: DeviceMesh) -> int:
    return mesh.get_local_rank("candidate")


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def group_values(value: float, mesh: DeviceMesh, reduce: str = "mean") -> list[float]:
    """Each group's value (mean or max over its ranks), all-gathered: the same list of G floats on every rank."""
    dev = torch.device(mesh.device_type)
    t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
    if mesh.size(1) > 1:
        op = {"mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[reduce]
        dist.all_reduce(t, op=op, group=mesh.get_group("dp"))
        if reduce == "mean":
            t /= mesh.size(1)
    out = [torch.zeros_like(t) for _ in range(mesh.size(0))]
    dist.all_gather(out, t, group=mesh.get_group("candidate"))
    return [float(x) for x in out]


@torch.no_grad()
def broadcast_group_state(src_group: int, mesh: DeviceMesh, tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` (plain or DTensor local shards, same structure in every group) on every rank with
    those of group ``src_group`` (rank (src_group, d) -> ranks (*, d)). A collective over the whole mesh."""
    group = mesh.get_group("candidate")
    dev = torch.device(mesh.device_type)
    for t in tensors:
        loc = _local(t)
        # nccl moves only GPU tensors: CPU state (Adam's 0-d step counts) travels through the mesh's device
        buf = loc if loc.is_contiguous() and loc.device.type == dev.type else loc.contiguous().to(dev)
        dist.broadcast(buf, group=group, group_src=src_group)
        if buf is not loc:
            loc.copy_(buf)


def model_and_optimizer_tensors(model: torch.nn.Module,
                                optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """Every tensor that is a run's state, in a deterministic order: parameters, buffers that are set, and the
    optimizer's state tensors (keys sorted). Structures must match across groups (same shapes, same optional
    state such as ages)."""
    out = [p for _, p in model.named_parameters()]
    out += [b for _, b in model.named_buffers() if b is not None]
    if optimizer is not None:
        for _, p in model.named_parameters():
            st = optimizer.state.get(p, {})
            out += [st[k] for k in sorted(st)]
    return out


def replicate_in_group(model: torch.nn.Module, mesh: DeviceMesh) -> torch.nn.Module:
    """DDP over this rank's group (the "dp" dimension of ``mesh``); a group of one process needs no wrapper.
    No buffer broadcast, as in ``parallelize``: RoPE tables and fade-in masks are computed alike on every rank."""
    if mesh.size(1) == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(model.parameters()).device
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False,
               process_group=mesh.get_group("dp"))


def state_structure(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype) of every tensor ``model_and_optimizer_tensors`` lists, in its order: what must match
    across groups before ``broadcast_group_state`` pairs tensors up by position."""
    names = [f"param/{n}" for n, _ in model.named_parameters()]
    names += [f"buffer/{n}" for n, b in model.named_buffers() if b is not None]
    if optimizer is not None:
        for n, p in model.named_parameters():
            names += [f"optim/{n}/{k}" for k in sorted(optimizer.state.get(p, {}))]
    tensors = model_and_optimizer_tensors(model, optimizer)
    return [(name, tuple(t.shape), str(t.dtype)) for name, t in zip(names, tensors)]


def adopt_optimizer_structure(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              structure: list[tuple[str, tuple, str]]) -> None:
    """Give ``optimizer`` exactly the state entries ``structure`` (another rank's ``state_structure``) lists:
    missing entries are created as zeros (their values arrive by broadcast), extra ones dropped. A candidate
    rebuilt from its plan without training lacks what training creates (fresh state under policy "reset")."""
    params = dict(model.named_parameters())
    want: dict[str, dict[str, tuple]] = {}
    for name, shape, dtype in structure:
        if name.startswith("optim/"):
            pname, key = name[len("optim/"):].rsplit("/", 1)
            want.setdefault(pname, {})[key] = (shape, getattr(torch, dtype.removeprefix("torch.")))
    for pname, p in params.items():
        st = optimizer.state.get(p, {})
        keys = want.get(pname, {})
        for k in [k for k in st if k not in keys]:
            del st[k]
        for k, (shape, dtype) in keys.items():
            if k not in st:  # the step count on CPU as torch's AdamW keeps it; the rest laid out like p (DTensor)
                st[k] = (torch.zeros_like(p, dtype=dtype) if tuple(shape) == tuple(p.shape) and k != "step"
                         else torch.zeros(shape, dtype=dtype, device="cpu" if k == "step" else p.device))
        if st:
            optimizer.state[p] = st


def move_to_mesh(model: torch.nn.Module, optimizer: torch.optim.Optimizer, mesh: DeviceMesh,
                 policy: str = "map+age") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An FSDP2 model and its optimizer re-sharded onto another mesh (world <-> one group's "dp" ranks): a growth
    by the identity plan through ``grow_sharded``, one parameter gathered at a time; fade-in masks (replicated
    buffers) are carried over. Every rank of both meshes calls it. Returns (model, optimizer)."""
    cfg = model.config
    same = GrowthPlan("same", {}, cfg, cfg, 0, identity_targets(cfg))
    new_model, new_opt = grow_sharded(model, optimizer, same, policy=policy, mesh=mesh)
    buffers = dict(model.named_buffers())
    for name in active_masks(model):
        set_buffer(new_model, name, buffers[name].clone())
    return new_model, new_opt
