"""``nanogrow.kernels.bench_kernels()`` (no CLI command): forward + backward time and peak memory of every kernel
against its torch reference, at LLM shapes (d_model 768 / 2048 / 4096 with their SwiGLU widths, head_dim 128,
vocab 50304 / 128256), in bf16.

Timing uses ``triton.testing.do_bench`` (median of repeated runs after a warm-up, gradients reset between runs);
peak memory is the CUDA allocator's high-water mark during one forward + backward, minus what was allocated
before it (inputs and their gradients excluded). Kernel timings mean nothing on CPU: there it says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

# From dispatch, not from the package front (nanogrow/kernels.py), which re-exports bench_kernels from here: the
# import graph points front -> bench -> dispatch, with no cycle.
from .dispatch import (add_rms_norm, cross_entropy, linear_cross_entropy, residual_add, rms_norm, rope, swiglu,
                       triton_status)

D_MODELS = (768, 2048, 4096)
VOCABS = (50304, 128256)
TOKENS = 8192  # e.g. 4 sequences of 2048
CE_TOKENS = 4096  # the torch reference holds [tokens, vocab] fp32 logits and their gradient: keep it on a 24 GB GPU
HEAD_DIM = 128


@dataclass
class Case:
    name: str
    shape: str
    make: Callable[[], list]  # fresh inputs (leaf tensors that require grad where the model would)
    fn: Callable  # fn(*inputs, backend) -> tensor or tuple of tensors


def _swiglu_width(d: int) -> int:
    return 256 * -(-8 * d // 3 // 256)


def llm_cases(device, dtype=torch.bfloat16, tokens=TOKENS, ce_tokens=CE_TOKENS, d_models=D_MODELS,
              vocabs=VOCABS, head_dim=HEAD_DIM) -> list[Case]:
    def t(*shape, grad=True, scale=1.0, dt=dtype):
        return (torch.randn(shape, device=device) * scale).to(dt).requires_grad_(grad)

    def fade(n):  # a fade-in in progress: the last quarter of the units at m = 0.5
        m = torch.ones(n, device=device)
        m[3 * n // 4:] = 0.5
        return m

    seq = min(2048, tokens)
    cases = []
    for d in d_models:
        f, nh = _swiglu_width(d), d // head_dim
        cases += [
            Case("rms_norm", f"{tokens}x{d}", lambda d=d: [t(tokens, d), t(d)],
                 lambda x, w, backend: rms_norm(x, w, 1e-5, backend)),
            Case("add_rms_norm", f"{tokens}x{d}", lambda d=d: [t(tokens, d), t(tokens, d), t(d)],
                 lambda h, b, w, backend: add_rms_norm(h, b, None, w, 1e-5, backend)),
            Case("add_rms_norm+fade", f"{tokens}x{d}", lambda d=d: [t(tokens, d), t(tokens, d), t(d), fade(d)],
                 lambda h, b, w, m, backend: add_rms_norm(h, b, m, w, 1e-5, backend)),
            Case("block_output+fade", f"{tokens}x{d}", lambda d=d: [t(tokens, d), t(tokens, d), fade(d)],
                 lambda h, b, m, backend: residual_add(h, b, m, backend)),
            Case("swiglu", f"{tokens}x{f}", lambda f=f: [t(tokens, f), t(tokens, f)],
                 lambda g, u, backend: swiglu(g, u, None, backend)),
            Case("swiglu+unit_mask", f"{tokens}x{f}", lambda f=f: [t(tokens, f), t(tokens, f), fade(f)],
                 lambda g, u, m, backend: swiglu(g, u, m, backend)),
            Case("rope", f"{tokens}x{nh}(q)+{max(nh // 4, 1)}(kv)x{head_dim}",
                 lambda nh=nh: [t(tokens // seq, seq, nh, head_dim), t(tokens // seq, seq, max(nh // 4, 1), head_dim),
                                *_tables(head_dim, seq, device)],
                 lambda q, k, cos, sin, backend: rope(q, k, cos, sin, backend)),
        ]
    for v in vocabs:
        cases.append(Case("cross_entropy", f"{ce_tokens}x{v}",
                          lambda v=v: [t(ce_tokens, v, scale=2.0), _targets(ce_tokens, v, device)],
                          lambda x, y, backend: cross_entropy(x, y, backend=backend)))
        for d in (d_models[0], d_models[-1]):
            cases.append(Case("linear_cross_entropy", f"{ce_tokens}x{d} @ {v}x{d}",
                              lambda v=v, d=d: [t(ce_tokens, d), t(v, d, scale=d ** -0.5),
                                                _targets(ce_tokens, v, device)],
                              lambda h, w, y, backend: linear_cross_entropy(h, w, y, backend=backend)))
    return cases


def _tables(head_dim, seq, device):
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    f = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    return [f.cos(), f.sin()]


def _targets(n, v, device):
    return torch.randint(0, v, (n,), device=device)


def _fwd_bwd(case: Case, backend: str):
    inputs = case.make()
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    outs = case.fn(*inputs, backend=backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    del outs

    def step():
        o = case.fn(*inputs, backend=backend)
        torch.autograd.backward(o if isinstance(o, tuple) else (o,), grads)

    return step, leaves


def _measure_cuda(step, leaves) -> tuple[float, float]:
    import triton.testing

    ms = triton.testing.do_bench(step, grad_to_none=leaves)
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for x in leaves:
        x.grad = None
    return ms, peak / 2 ** 20


def _measure_wallclock(step, leaves) -> tuple[float, float]:
    t0 = time.perf_counter()
    step()
    for x in leaves:
        x.grad = None
    return (time.perf_counter() - t0) * 1e3, float("nan")


def run_cases(cases: list[Case], log=print, measure=_measure_cuda) -> list[dict]:
    """Time every case with both backends; logs a table and returns its rows."""
    rows = []
    log(f"{'kernel':<22} {'shape':<28} {'torch ms':>9} {'triton ms':>9} {'speedup':>8} "
        f"{'torch MiB':>10} {'triton MiB':>10}")
    for case in cases:
        r = {"kernel": case.name, "shape": case.shape}
        for backend in ("torch", "triton"):
            step, leaves = _fwd_bwd(case, backend)
            r[f"{backend}_ms"], r[f"{backend}_mib"] = measure(step, leaves)
            del step, leaves
        r["speedup"] = r["torch_ms"] / r["triton_ms"]
        log(f"{case.name:<22} {case.shape:<28} {r['torch_ms']:>9.3f} {r['triton_ms']:>9.3f} {r['speedup']:>7.2f}x "
            f"{r['torch_mib']:>10.1f} {r['triton_mib']:>10.1f}")
        rows.append(r)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def bench_kernels(log=print) -> int:
    """Forward+backward time and peak memory of each kernel vs its torch reference at LLM shapes (CUDA only; on CPU
    says so and returns 0)."""
    if not torch.cuda.is_available():
        log("nanogrow bench kernels: kernel timings need a GPU (CUDA); on CPU the model runs the torch references "
            "and Triton only through its interpreter, whose timings mean nothing. Nothing measured.")
        return 0
    reason = triton_status("cuda")
    if reason is not None:
        log(f"nanogrow bench kernels: the Triton kernels cannot run: {reason}")
        return 1
    log(f"nanogrow bench kernels on {torch.cuda.get_device_name()}: forward + backward, bf16, "
        f"torch {torch.__version__}")
    run_cases(llm_cases("cuda"), log=log)
    return 0
