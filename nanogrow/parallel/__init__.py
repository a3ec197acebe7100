"""Parallelism applied to the model from outside it: backends (none / DDP / FSDP2, HSDP), growth of a
parallelised model in place (sharded, one parameter at a time), process groups for LAG, and the growth
benchmark. DeepSpeed ZeRO 1-3 growth lives in ``nanogrow.parallel.zero`` (deepspeed itself is imported on demand:
it is optional); the Trainer's ZeRO backend, which also reads and writes checkpoints, is ``nanogrow.backend``, one
layer up. The model and the growth operators know nothing of this package."""

from typing import Any

from .backends import (BACKENDS, backend_of, compile_blocks, dist_backend, grad_sync, make_mesh, parallelize,
                       reshard, unwrap)
from .groups import broadcast_group_state, candidate_index, candidate_mesh, group_values, model_and_optimizer_tensors
from .sharded import grow_ddp, grow_parallel, grow_sharded, grown_optimizer


def bench_grow(*args: Any, **kwargs: Any) -> dict:
    """See ``nanogrow.parallel.bench.bench_grow``."""
    from .bench import bench_grow as _bench_grow
    return _bench_grow(*args, **kwargs)


__all__ = [
    "BACKENDS", "backend_of", "compile_blocks", "dist_backend", "grad_sync", "make_mesh", "parallelize", "reshard",
    "unwrap",
    "broadcast_group_state", "candidate_index", "candidate_mesh", "group_values", "model_and_optimizer_tensors",
    "grow_ddp", "grow_parallel", "grow_sharded", "grown_optimizer", "bench_grow",
]
