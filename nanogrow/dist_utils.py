"""Process-group helpers that work the same on one process (no torch.distributed) and under torchrun."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank_from_env() -> int:
    """This process's rank as torchrun gives it, before any process group exists."""
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: this rank's GPU when CUDA is present, else CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        requested = f"cuda:{local_rank()}"
    device = torch.device(requested)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_from_env(device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the torchrun job when launched by torchrun (WORLD_SIZE set): nccl on CUDA, gloo on CPU.
    A short timeout on CPU turns a dead peer into a clear error instead of a long hang."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0 and rank_from_env() == 0
            and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1"):
        print("nanogrow: warning: torchrun --max-restarts with the rendezvous store shared with the workers: a "
              "restarted group may read the dead group's addresses and fail to connect (pytorch/pytorch#135712); "
              "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (launch/*.sh do)", file=sys.stderr)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (a collective; a barrier that also carries one bit)."""
    if not is_distributed():
        return flag
    on_gpu = dist.get_backend() == "nccl"
    t = torch.tensor([int(flag)], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def shutdown_and_exit() -> None:
    """Under torchrun: leave the process group, then exit at once. A finished gloo job sometimes aborts during
    interpreter shutdown ("terminate called without an active exception", SIGABRT, about one run in ten),
    turning a good run into a failed job. On one process this returns and the program ends normally."""
    if not is_distributed():
        return
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
