"""Process groups for LAG (issue: train one growth candidate per group of ranks, then keep the best).

    mesh = candidate_mesh(n_groups)        # 2-D ("candidate", "dp"): group g = ranks [g*dp, (g+1)*dp)
    g = candidate_index(mesh)              # which candidate this rank trains
    model = parallelize(model, "fsdp", mesh["dp"])        # or DDP / none inside the group
    losses = group_values(val_loss, mesh)  # [G] floats, the same on every rank (mean over each group's ranks)
    broadcast_group_state(winner, mesh, tensors)          # every group takes the winner's state

The broadcast pairs rank (g, d) with rank (winner, d): local shards of a model sharded over "dp" line up, so
a sharded winner is copied shard by shard without gathering.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from .backends import device_type


def candidate_mesh(n_groups: int, device: str | None = None):
    """Split the world into ``n_groups`` equal groups: a 2-D DeviceMesh ("candidate", "dp")."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("candidate_mesh needs torch.distributed (launch with torchrun)")
    world = dist.get_world_size()
    if n_groups < 1 or world % n_groups:
        raise ValueError(f"n_groups={n_groups} must divide the world size {world}")
    return init_device_mesh(device or device_type(), (n_groups, world // n_groups),
                            mesh_dim_names=("candidate", "dp"))


def candidate_index(mesh) -> int:
    return mesh.get_local_rank("candidate")


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def group_values(value: float, mesh, reduce: str = "mean") -> list[float]:
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
def broadcast_group_state(src_group: int, mesh, tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` (plain or DTensor local shards, same structure in every group) on every rank with
    those of group ``src_group`` (rank (src_group, d) -> ranks (*, d)). A collective over the whole mesh."""
    group = mesh.get_group("candidate")
    for t in tensors:
        loc = _local(t)
        buf = loc if loc.is_contiguous() else loc.contiguous()
        dist.broadcast(buf, group=group, group_src=src_group)
        if buf is not loc:
            loc.copy_(buf)


def model_and_optimizer_tensors(model, optimizer=None) -> list[torch.Tensor]:
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
