"""Benchmarks that print numbers: throughput of a config (tokens/s, MFU, peak memory)."""

from __future__ import annotations

import resource
import statistics
import time

import torch

from .config import RunConfig
from .metrics import cpu_matmul_peak_flops, device_peak_flops
from .model import build_model
from .train import make_optimizer


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def throughput(cfg: RunConfig, warmup: int = 3, steps: int = 10, log=print) -> dict:
    """Median optimizer-step time of ``cfg``'s model on random tokens (no data needed), after ``warmup`` steps."""
    from .dist_utils import pick_device

    t = cfg.train
    device = pick_device(t.device)
    mc = cfg.model.resolved()
    torch.manual_seed(t.seed)
    model = build_model(mc, device, seed=t.seed)
    if t.compile:
        model = torch.compile(model)
    opt = make_optimizer(model, t)
    use_bf16 = t.dtype == "bf16" or (t.dtype == "auto" and device.type == "cuda")
    T, B = cfg.data.seq_len, t.micro_batch
    tokens = B * T * t.grad_accum
    times = []
    for i in range(warmup + steps):
        x = torch.randint(0, mc.vocab_size, (B, T), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(t.grad_accum):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(x, x)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    peak = device_peak_flops(device)
    fpt = mc.flops_per_token(T)
    out = {
        "params": mc.num_params(), "non_embedding_params": mc.num_params(False),
        "flops_per_token": fpt, "tokens_per_step": tokens, "median_step_s": med,
        "tokens_per_s": tokens / med, "mfu": tokens * fpt / med / peak if peak else 0.0,
        "peak_flops": peak, "peak_memory_mib": peak_memory_bytes(device) / 2**20, "device": str(device),
    }
    log(f"model {mc.n_layer}L d{mc.d_model} h{mc.n_head}/{mc.n_kv_head} ff{mc.d_ff} vocab {mc.vocab_size}: "
        f"{out['params'] / 1e6:.2f}M params, {fpt / 1e6:.1f} MFLOPs/token")
    log(f"{out['tokens_per_s']:,.0f} tokens/s | MFU {100 * out['mfu']:.1f}% of {peak / 1e9:.1f} GFLOP/s "
        f"({'measured matmul peak' if device.type == 'cpu' else 'device table'}) | median step "
        f"{1e3 * med:.1f} ms over {steps} steps | peak memory {out['peak_memory_mib']:.0f} MiB on {device}")
    return out


__all__ = ["throughput", "cpu_matmul_peak_flops", "peak_memory_bytes"]
