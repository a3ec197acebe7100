"""DTensor helpers for checkpoint loading under FSDP2.

``nanogrow.checkpoint._materialise_missing`` creates destination tensors for optional state a fresh optimizer
lacks (per-element ``age`` / ``lr_scale``). As plain full-size tensors they load correctly through DCP but then
sit next to DTensor parameters and moments, and the first optimizer step fails ("got mixed torch.Tensor and
DTensor"). ``placeholder`` is what that function should create instead (sharded like the parameter, so nothing is
gathered); ``shard_plain_state`` repairs an optimizer loaded without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def placeholder(ref: torch.Tensor | None, size: Sequence[int], dtype: torch.dtype,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """A zero destination tensor of global shape ``size``: laid out like ``ref`` (a parameter or moment, plain
    or DTensor) when it has that shape, else a plain tensor."""
    if ref is not None and tuple(ref.shape) == tuple(size):
        return torch.zeros_like(ref, dtype=dtype)
    return torch.zeros(tuple(size), dtype=dtype, device=ref.device if ref is not None else device)


@torch.no_grad()
def shard_plain_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Turn plain full-size optimizer state tensors of DTensor parameters into DTensors laid out like the
    parameter (each rank keeps its slice). Returns how many were converted."""
    from torch.distributed.tensor import distribute_tensor

    n = 0
    for p in (q for g in optimizer.param_groups for q in g["params"]):
        if not _is_dtensor(p):
            continue
        st = optimizer.state.get(p, {})
        for k, v in list(st.items()):
            if isinstance(v, torch.Tensor) and not _is_dtensor(v) and tuple(v.shape) == tuple(p.shape) and v.dim():
                st[k] = distribute_tensor(v.to(p.to_local().device), p.device_mesh, p.placements,
                                          src_data_rank=None)
                n += 1
    return n
