"""Parallel backends applied to a model from outside it (torchtitan's order: per block, then the root).

    mesh = make_mesh("fsdp", replicate=1)                  # None for "none"
    model = parallelize(model, "fsdp", mesh, mixed_precision=False)

``none``: the model as it is (the trainer may still average gradients by hand). ``ddp``: torch DDP.
``fsdp``: FSDP2 (``fully_shard``) on every block of ``model.layers``, then on the root; with a 2-D mesh
("replicate", "shard") it is HSDP. Mixed precision (bf16 params, fp32 reductions) only on CUDA: on CPU gloo it
would only cost time and break the fp32 equality the tests check.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

BACKENDS = ("none", "ddp", "fsdp")


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def dist_backend(device: torch.device | str | None = None) -> str:
    """nccl on CUDA, gloo on CPU."""
    dev = torch.device(device) if device is not None else torch.device(device_type())
    return "nccl" if dev.type == "cuda" else "gloo"


def make_mesh(backend: str, replicate: int = 1, device: str | None = None) -> DeviceMesh | None:
    """The device mesh ``backend`` runs on: None for none/ddp; 1-D ("shard",) for FSDP; 2-D ("replicate", "shard")
    for HSDP when ``replicate`` > 1 (replicate must divide the world size)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown parallel backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend != "fsdp":
        return None
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size() if dist.is_initialized() else 1
    if replicate < 1 or world % replicate:
        raise ValueError(f"parallel replicate degree {replicate} must divide the world size {world}")
    dev = device or device_type()
    if replicate == 1:
        return init_device_mesh(dev, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(dev, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))


def fsdp_kwargs(mesh: DeviceMesh, mixed_precision: bool = False) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    kw = {"mesh": mesh}
    if mixed_precision and mesh.device_type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return kw


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, mixed_precision: bool = False) -> nn.Module:
    """``fully_shard`` every block, then the root (which then holds embedding, final norm and head)."""
    from torch.distributed.fsdp import fully_shard

    kw = fsdp_kwargs(mesh, mixed_precision)
    for block in model.layers.values():
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def parallelize(model: nn.Module, backend: str = "none", mesh: DeviceMesh | None = None, mixed_precision: bool = False,
                replicate: int = 1) -> nn.Module:
    """Apply ``backend`` to ``model`` (in place for FSDP; DDP returns a wrapper). ``mesh`` defaults to
    ``make_mesh(backend, replicate)``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown parallel backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "none":
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"parallel backend {backend!r} needs torch.distributed (launch with torchrun)")
    if backend == "fsdp":
        return apply_fsdp(model, mesh if mesh is not None else make_mesh("fsdp", replicate), mixed_precision)
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(model.parameters()).device
    # No buffer broadcast: RoPE tables and fade-in masks are computed identically on every rank, and a mask that
    # MaskRamp replaces would not be in DDP's cached buffer list anyway. (torch 2.13 deprecates the flag in favour
    # of forward_sync_buffers, which still broadcasts at init and is absent from older releases: keep the flag,
    # without its FutureWarning on every rank.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)


def backend_of(model: nn.Module) -> str:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP):
        return "ddp"
    if isinstance(model, FSDPModule):
        return "fsdp"
    if "deepspeed" in sys.modules and isinstance(model, sys.modules["deepspeed"].DeepSpeedEngine):
        return "deepspeed"  # (checked only once deepspeed is imported: it is optional and slow to import)
    return "none"


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool = True) -> Iterator[None]:
    """Backward passes inside this block reduce gradients over ranks only if ``sync``: otherwise they accumulate
    locally (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync(False)``: unsharded gradients are kept until a
    synced backward reduces the sum). For gradient accumulation: sync only the last micro-batch, one reduction
    per optimizer step instead of one per micro-batch. A no-op for one process and for DeepSpeed (which reduces
    at its own accumulation boundary)."""
    backend = backend_of(model)
    if sync or backend not in ("ddp", "fsdp"):
        yield
        return
    if backend == "ddp":
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer itself (DDP and DeepSpeed wrap it; FSDP2 changes its class in place, so it is its own
    module)."""
    return model.module if backend_of(model) in ("ddp", "deepspeed") else model


_compiled_block_forward = []  # Block.forward, compiled once and shared by every block of every model


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` each block of ``model.layers`` in place (torchtitan's per-block compile); returns how many
    blocks were newly compiled. A block's ``forward`` becomes the class's compiled forward bound to it, so:
    parameter names and state-dict keys do not change (growth plans, checkpoints and HF export see the same
    model); FSDP2/DDP hooks stay outside the graph; ``copy.deepcopy`` rebinds it to the copy; and all blocks
    share one dynamo cache, with parameters and mask buffers as graph inputs: a fade-in mask changing value each
    step does not recompile, a mask appearing or disappearing (or a new shape after growth) compiles once.
    Blocks already compiled are left alone, so calling it again after a growth compiles only the new blocks."""

    import torch._dynamo

    cfg = torch._dynamo.config
    # Every (shape, masks present, grad mode) variant of the one shared forward is a cache entry; growth adds
    # some, and torch's default limit (8) would silently fall back to eager after a few growth events.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < 64:
            setattr(cfg, name, 64)
    n = 0
    for block in unwrap(model).layers.values():
        if "forward" in block.__dict__:
            continue
        if not _compiled_block_forward:
            from nanogrow.model import Block
            _compiled_block_forward.append(torch.compile(Block.forward))
        block.forward = types.MethodType(_compiled_block_forward[0], block)
        n += 1
    return n


def fsdp_mesh(model: nn.Module) -> DeviceMesh:
    """The mesh an FSDP2 model's parameters live on."""
    return next(model.parameters()).device_mesh


def reshard(model: nn.Module) -> None:
    """Reshard an FSDP2 model left unsharded by a forward under ``no_grad`` (eval): otherwise
    ``get_optimizer_state_dict`` fails with ``KeyError: 0`` and parameters are not the sharded DTensors."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
