"""``nanogrow bench gpu`` (``launch/gpu_check.sh``): everything worth knowing from a first, short session on one CUDA
GPU, in about 8 minutes, printed as one table.

    1. kernels   every Triton kernel against its torch reference at LLM shapes (bf16): forward + backward time,
                 peak memory, max error of outputs and input gradients (``nanogrow.kernels.bench`` cases)
    2. training  a ~100M-parameter model in bf16: torch kernels, Triton kernels, Triton + per-block compile (and
                 SDPA instead of flash-attn when flash-attn imports): tokens/s and MFU (``bench.throughput``)
    3. growth    one growth event per operator under FSDP2 on this GPU, in steps of training time
                 (``torchrun --nproc_per_node=1 -m nanogrow.cli bench grow``)

Without CUDA it says so and returns 0 (nothing to measure). The sections take their shapes as arguments, so the
tests run each of them at toy sizes on CPU; only the CUDA timings themselves are untested here.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

# A ~100M model: 12 x 768, GQA 12/4, SwiGLU 2048, vocab 32768 (tied), 1024-token sequences.
TRAIN_SHAPE = dict(n_layer=12, d_model=768, n_head=12, n_kv_head=4, d_ff=2048, vocab_size=32768,
                   tie_embeddings=True, max_seq_len=1024)
TRAIN_BATCH = dict(micro_batch=8, seq_len=1024)


@dataclass
class Table:
    """Rows of (section, what, numbers...) printed as one aligned table at the end."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, section: str, what: str, result: str) -> None:
        self.rows.append((section, what, result))

    def render(self) -> str:
        w0 = max([len(r[0]) for r in self.rows] + [7])
        w1 = max([len(r[1]) for r in self.rows] + [4])
        lines = [f"{'section':<{w0}}  {'what':<{w1}}  result", "-" * (w0 + w1 + 40)]
        lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in self.rows]
        return "\n".join(lines)


def _max_err(case, device) -> float:
    """Max absolute difference between the Triton and torch backends over outputs and input gradients."""
    torch.manual_seed(0)
    inputs = case.make()
    results = []
    for backend in ("torch", "triton"):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
              for x in inputs]
        out = case.fn(*xs, backend=backend)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator(device=device).manual_seed(1)
        grads = [torch.randn(o.shape, generator=g, device=device).to(o.dtype) for o in outs]
        torch.autograd.backward(outs, grads)
        results.append([o.detach().float() for o in outs] +
                       [x.grad.float() for x in xs if isinstance(x, torch.Tensor) and x.grad is not None])
    return max((a - b).abs().max().item() for a, b in zip(*results))


def kernels_section(table: Table, device: str = "cuda", measure=None, **shapes) -> list[dict]:
    """Section 1. ``shapes``: ``llm_cases`` keyword arguments (the tests pass toy sizes); ``measure``: the timer
    (CUDA events by default)."""
    from .kernels.bench import _measure_cuda, llm_cases, run_cases

    cases = llm_cases(device, **shapes)
    rows = run_cases(cases, log=lambda *_: None, measure=measure or _measure_cuda)
    for case, r in zip(cases, rows):
        r["max_err"] = _max_err(case, device)
        table.add("kernels", f"{r['kernel']} {r['shape']}",
                  f"torch {r['torch_ms']:.3f} ms / triton {r['triton_ms']:.3f} ms ({r['speedup']:.2f}x), "
                  f"peak {r['torch_mib']:.0f} / {r['triton_mib']:.0f} MiB, max err {r['max_err']:.2e}")
    return rows


def training_variants(flash: bool) -> dict[str, dict]:
    """The training runs of section 2: name -> (model.kernels, train.compile, use flash-attn)."""
    v = {"torch kernels": dict(kernels="torch", compile=False, flash=flash),
         "triton kernels": dict(kernels="triton", compile=False, flash=flash),
         "triton + compile": dict(kernels="triton", compile=True, flash=flash)}
    if flash:
        v["triton, SDPA (no flash-attn)"] = dict(kernels="triton", compile=False, flash=False)
    return v


def training_section(table: Table, device: str = "cuda", shape: dict | None = None, batch: dict | None = None,
                     steps: int = 10, warmup: int = 3, variants: dict | None = None, dtype: str = "bf16") -> dict:
    """Section 2: ``bench.throughput`` of the ~100M model (or ``shape``) per variant."""
    from . import model as model_mod
    from .bench import throughput
    from .config import RunConfig

    variants = variants or training_variants(model_mod.flash_attn_func is not None)
    out = {}
    for name, v in variants.items():
        cfg = RunConfig()
        for k, val in {**TRAIN_SHAPE, **(shape or {}), "kernels": v["kernels"]}.items():
            setattr(cfg.model, k, val)
        b = {**TRAIN_BATCH, **(batch or {})}
        cfg.data.seq_len, cfg.train.micro_batch = b["seq_len"], b["micro_batch"]
        cfg.train.device, cfg.train.dtype, cfg.train.compile = device, dtype, v["compile"]
        saved = model_mod.flash_attn_func
        if not v["flash"]:
            model_mod.flash_attn_func = None
        try:
            t0 = time.perf_counter()
            r = throughput(cfg, warmup=warmup, steps=steps, log=lambda *_: None)
            r["seconds"] = time.perf_counter() - t0
        except Exception as e:  # one failing variant (e.g. a compile error) must not hide the others
            r = {"error": f"{type(e).__name__}: {e}"}
        finally:
            model_mod.flash_attn_func = saved
        out[name] = r
        table.add("training", name, r["error"] if "error" in r else
                  f"{r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}%, peak {r['peak_memory_mib']:.0f} MiB"
                  f" ({r['params'] / 1e6:.0f}M params, {r['seconds']:.0f} s incl. warm-up/compile)")
    return out


def growth_command(steps: int = 3) -> list[str]:
    """Section 3's command: one FSDP2 process on this GPU, one growth event per operator."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
            "nanogrow.cli", "bench", "grow", "--backend", "fsdp", "--steps", str(steps)]


def growth_section(table: Table, command: list[str] | None = None, timeout: float = 240) -> str:
    """Section 3: runs ``growth_command`` and puts its per-operator lines in the table."""
    try:
        p = subprocess.run(command or growth_command(), capture_output=True, text=True, timeout=timeout)
        text, ok = p.stdout + p.stderr, p.returncode == 0
    except subprocess.TimeoutExpired:
        text, ok = f"timed out after {timeout:.0f} s", False
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if " steps | " in ln] if ok else lines[-3:]  # bench grow's per-operator lines
    for ln in keep or ["(no output)"]:
        table.add("growth (FSDP2, 1 GPU)", "" if ok else "FAILED", ln)
    return text


def gpu_check(log=print, kernels: bool = True, training: bool = True, growth: bool = True) -> int:
    """Run the three sections on CUDA device 0 and print one table. Returns 0 (also on a machine without CUDA,
    which it reports), 1 if a section failed."""
    if not torch.cuda.is_available():
        log("nanogrow bench gpu: no CUDA device here (torch.cuda.is_available() is False): nothing to measure. "
            "Run it on a machine with one GPU: launch/gpu_check.sh")
        return 0
    from .kernels import triton_status

    table, failed = Table(), False
    name = torch.cuda.get_device_name()
    log(f"nanogrow bench gpu on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    reason = triton_status("cuda")
    t0 = time.perf_counter()
    if kernels:
        if reason is None:
            kernels_section(table)
        else:
            table.add("kernels", "Triton", f"cannot run: {reason}")
            failed = True
        log(f"kernels done ({time.perf_counter() - t0:.0f} s)")
    if training:
        from . import model as model_mod

        variants = training_variants(model_mod.flash_attn_func is not None)
        if reason is not None:
            variants = {k: v for k, v in variants.items() if v["kernels"] == "torch"}
        res = training_section(table, variants=copy.deepcopy(variants))
        failed |= any("error" in r for r in res.values())
        log(f"training done ({time.perf_counter() - t0:.0f} s)")
    if growth:
        growth_section(table)
        log(f"growth done ({time.perf_counter() - t0:.0f} s)")
    log(table.render())
    return 1 if failed else 0


__all__ = ["gpu_check", "kernels_section", "training_section", "growth_section", "growth_command", "Table",
           "training_variants"]
