"""``nanogrow bench grow``: what one growth event costs under a parallel backend, relative to training.

    torchrun --standalone --nproc_per_node=2 -m nanogrow.cli bench grow                        # FSDP2
    torchrun --standalone --nproc_per_node=2 -m nanogrow.cli bench grow --backend deepspeed    # ZeRO 1, 2, 3

Reports, per operator: the wall time of one growth event (weights + optimizer state, ``grow_parallel``;
``grow_zero`` under DeepSpeed, policy "map") divided by
the time of one training step of the old model, and each rank's peak memory while growing divided by its peak
in steady-state training. Memory on CPU is the resident set: the kernel's high-water mark (VmHWM), reset before
each phase through /proc/self/clear_refs; shown as the absolute peaks and as the increase over the RSS the phase
started from. On CUDA it is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import ctypes
import gc
import time
from dataclasses import replace
from typing import Callable

import torch
import torch.distributed as dist

from nanogrow import dist_utils
from nanogrow.grow import make_plan
from nanogrow.grow.optim import AdamW
from nanogrow.model import ModelConfig, build_model

from .backends import parallelize, unwrap
from .sharded import grow_parallel
from .zero import destroy, ds_config, grow_zero, zero_initialize

# ~7.4M parameters: big enough that a CPU step and a growth take measurable time, small enough for 2 CPU ranks.
BENCH_MODEL = ModelConfig(n_layer=4, d_model=256, n_head=4, n_kv_head=2, vocab_size=8192, max_seq_len=128)
BENCH_OPS = {  # name -> (operator, shape change, options)
    "stack": ("stack", {"n_layer": 8}, {}),
    "zero": ("zero", {"d_model": 384, "n_head": 6, "n_kv_head": 3}, {}),
    "msg": ("msg", {"d_ff": 1024}, {"fade_steps": 100}),
}


def _exact_rss() -> None:
    """Make the resident set follow live tensors on glibc: allocations above 64 KiB are mmapped (a fixed
    threshold: glibc otherwise raises it after frees and recycles freed heap, so a phase's new tensors would not
    show) and freed memory is returned before each phase (malloc_trim)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = None


class _Peak:
    """Peak memory of this process over a phase (bytes) and the level it started from."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            if _LIBC is not None:
                _LIBC.malloc_trim(0)
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            except OSError:
                pass
            self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = self._status("VmHWM")


def _step(model, opt, cfg: ModelConfig, batch: int, seq: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed * 1000 + dist_utils.rank())
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(next(model.parameters()).device)
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _zero_step(engine, cfg: ModelConfig, batch: int, seq: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed * 1000 + dist_utils.rank())
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(engine.device)
    engine.backward(engine(x[:, :-1], x[:, 1:]))
    engine.step()


def _max_over_ranks(values: list[float], device) -> list[float]:
    if not dist_utils.is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _one(name, cfg, backend, device, batch, seq, steps, warmup) -> tuple:
    """One model trained ``steps`` steps, grown once by BENCH_OPS[name], then one step of the grown model:
    (step s, growth s, first grown step s, growth peak, steady peak, growth increase, steady increase)."""
    op, change, options = BENCH_OPS[name]
    plan = make_plan(op, cfg, replace(cfg, **change), seed=0, **options)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg, device, seed=0), backend)
    opt = AdamW(unwrap(model).parameters() if backend == "ddp" else model.parameters(), lr=1e-3, ages=True)
    for s in range(warmup):
        _step(model, opt, cfg, batch, seq, s)
    dist_utils.barrier()
    with _Peak(device) as steady:
        t0 = time.perf_counter()
        for s in range(steps):
            _step(model, opt, cfg, batch, seq, warmup + s)
        dist_utils.barrier()
        step_s = (time.perf_counter() - t0) / steps
    with _Peak(device) as growing:
        t0 = time.perf_counter()
        new_model, new_opt = grow_parallel(model, opt, plan, policy="map+age", device=device)
        dist_utils.barrier()
        grow_s = time.perf_counter() - t0
    del model, opt  # the trainer drops the old model after a growth
    t0 = time.perf_counter()
    _step(new_model, new_opt, plan.new_cfg, batch, seq, 99)  # the grown model trains
    dist_utils.barrier()
    new_step_s = time.perf_counter() - t0
    del new_model, new_opt
    gc.collect()
    return (step_s, grow_s, new_step_s, growing.peak, steady.peak, growing.peak - growing.start,
            steady.peak - steady.start)


def _one_zero(name, cfg, stage, device, batch, seq, steps, warmup) -> tuple:
    """``_one`` under DeepSpeed ZeRO ``stage``: growth is ``grow_zero`` (policy "map": ZeRO holds no ages)."""

    op, change, options = BENCH_OPS[name]
    plan = make_plan(op, cfg, replace(cfg, **change), seed=0, **options)
    torch.manual_seed(0)
    model = build_model(cfg, device, seed=0)
    groups = [{"params": list(model.parameters()), "lr": 1e-3, "weight_decay": 0.0}]
    run = zero_initialize(model, groups, ds_config(stage, batch))
    del model, groups
    for s in range(warmup):
        _zero_step(run.engine, cfg, batch, seq, s)
    dist_utils.barrier()
    with _Peak(device) as steady:
        t0 = time.perf_counter()
        for s in range(steps):
            _zero_step(run.engine, cfg, batch, seq, warmup + s)
        dist_utils.barrier()
        step_s = (time.perf_counter() - t0) / steps
    with _Peak(device) as growing:
        t0 = time.perf_counter()
        run = grow_zero(run, plan, policy="map")  # destroys the old engine
        dist_utils.barrier()
        grow_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _zero_step(run.engine, plan.new_cfg, batch, seq, 99)
    dist_utils.barrier()
    new_step_s = time.perf_counter() - t0
    destroy(run)
    return (step_s, grow_s, new_step_s, growing.peak, steady.peak, growing.peak - growing.start,
            steady.peak - steady.start)


def bench_grow(cfg: ModelConfig | None = None, ops: list[str] | None = None, backend: str = "fsdp",
               batch: int = 4, seq: int = 128, steps: int = 3, warmup: int = 1, zero_stages: list[int] | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Time and memory of one growth event (weights + optimizer) relative to a training step, per operator in
    ``ops`` (keys of BENCH_OPS). Run under torchrun (one process works too). Returns {op: numbers} (backend
    "deepspeed": {"zero<stage>/<op>": numbers} for each of ``zero_stages``); rank 0 logs."""
    global _LIBC
    device = dist_utils.pick_device("auto")
    dist_utils.init_from_env(device)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    say = log if rank == 0 else (lambda *a, **k: None)
    cfg = (cfg or BENCH_MODEL).resolved()
    if seq > cfg.max_seq_len:
        raise ValueError(f"bench grow: seq={seq} exceeds model.max_seq_len={cfg.max_seq_len}")
    ops = list(ops or BENCH_OPS)
    say(f"bench grow: {backend} on {world} process(es), {device}; model {cfg.num_params():,} params, "
        f"batch {batch}x{seq} per rank, {torch.get_num_threads()} thread(s)/rank")
    if backend == "deepspeed":  # one case per (ZeRO stage, operator)
        cases = {f"zero{z}/{name}": (name, z) for z in (zero_stages or [1, 2, 3]) for name in ops}
    else:
        cases = {name: (name, None) for name in ops}

    def one(key, steps_):
        name, stage = cases[key]
        if stage is None:
            return _one(name, cfg, backend, device, batch, seq, steps_, warmup)
        return _one_zero(name, cfg, stage, device, batch, seq, steps_, warmup)

    # Two passes: times with the default allocator, then memory with the RSS made exact (which slows steps).
    timed = {key: one(key, steps) for key in cases}
    if device.type == "cpu" and _LIBC is None:
        _LIBC = _exact_rss()
    mem = {key: one(key, 1) for key in cases}
    results = {}
    for key, (name, stage) in cases.items():
        step_s, grow_s, new_step_s = _max_over_ranks(list(timed[key][:3]), device)
        g_peak, s_peak, g_inc, s_inc = _max_over_ranks(list(mem[key][3:]), device)
        plan_cfg = replace(cfg, **BENCH_OPS[name][1]).resolved()
        r = {"op": BENCH_OPS[name][0], "params_before": cfg.num_params(), "params_after": plan_cfg.num_params(),
             "step_s": step_s, "grow_s": grow_s, "grow_over_step": grow_s / step_s, "first_grown_step_s": new_step_s,
             "peak_grow_bytes": g_peak, "peak_steady_bytes": s_peak, "peak_ratio": g_peak / s_peak,
             "grow_increase_bytes": g_inc, "steady_increase_bytes": s_inc, "world": world, "backend": backend,
             "zero_stage": stage}
        results[key] = r
        say(f"  {key:12s} {r['params_before'] / 1e6:.1f}M -> {r['params_after'] / 1e6:.1f}M params | step "
            f"{1e3 * step_s:.0f} ms | growth {1e3 * grow_s:.0f} ms = {r['grow_over_step']:.2f} steps | peak memory "
            f"growing {g_peak / 2**20:.0f} MiB vs training {s_peak / 2**20:.0f} MiB (x{r['peak_ratio']:.2f}); "
            f"above phase start: +{g_inc / 2**20:.0f} vs +{s_inc / 2**20:.0f} MiB")
    return results


if __name__ == "__main__":
    import os
    import sys

    torch.set_num_threads(1)
    bench_grow()
    dist_utils.shutdown()
    # A finished gloo job sometimes aborts in interpreter teardown ("terminate called without an active
    # exception"); nothing is left to do, so leave without it.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
