"""Throughput accounting: FLOPs accumulated step by step, tokens/s, model FLOPs utilisation (MFU), and the
per-stage statistics of a run (``StageStats``).

Growth changes FLOPs per token mid-run, so FLOPs are *accumulated* from each step's own shape (OLMo-core's lesson),
never computed as steps x a constant. Every forward or backward pass a run computes is counted, by what it was for
(``CATEGORIES``): a forward pass costs a third of the training FLOPs per token (``forward_flops``). MFU divides
achieved model FLOPs/s by the device peak: a table for known GPUs, and on CPU a peak measured once by a large matmul
probe (what this machine can actually do in fp32).
"""

from __future__ import annotations

import functools
import time

import torch

# Dense peak FLOP/s per device for the dtype used in training (bf16 tensor cores; no sparsity).
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; PCIe is ~756e12
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "MI300X": 1307e12,
    "B200": 2250e12,
}


@functools.lru_cache(maxsize=None)
def cpu_matmul_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n matmul over a few repeats, on the threads torch uses (measured once)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def device_peak_flops(device: torch.device) -> float:
    """Peak FLOP/s for MFU: GPU table by device name, a measured matmul peak on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                return peak
        return 0.0  # unknown GPU: MFU is reported as 0 rather than a made-up number
    return cpu_matmul_peak_flops()


# What a run computes, by purpose. The FLOPs a comparison charges a run (``ThroughputMeter.total_flops``, what
# train.max_flops and at_flops marks count) are every category but "eval": evaluation done only for reporting (the
# curve's validation losses, the loss before and after a growth event, a study's final scoring) decides nothing.
#   train      optimizer steps the run keeps (a LAG winner's candidate steps included)
#   selection  LAG: every candidate's scoring passes, and all a losing candidate spent (its steps, its fit)
#   probe      trigger probes (the curvature trigger's extra forward pass)
#   fit        fitting a learned (LiGO) operator's maps before it is applied
#   eval       evaluation for reporting only: counted, never charged
CATEGORIES = ("train", "selection", "probe", "fit", "eval")
CHARGED = ("train", "selection", "probe", "fit")


def forward_flops(tokens: int, flops_per_token: float) -> float:
    """FLOPs of a forward pass alone over ``tokens``: a third of the training FLOPs per token (2N of 6N; the
    attention term alike). ``flops_per_token``: ``ModelConfig.flops_per_token`` at the sequence length used."""
    return tokens * flops_per_token / 3.0


class ThroughputMeter:
    """Accumulates tokens and FLOPs per category (``CATEGORIES``) and reports rates over the last logging window.
    ``total_flops`` is the charged total (every category but "eval"); ``flops_by`` the breakdown."""

    def __init__(self, peak_flops: float, world_size: int = 1):
        self.peak = peak_flops * world_size
        self.total_tokens = 0
        self.total_flops = 0.0
        self.flops_by = dict.fromkeys(CATEGORIES, 0.0)
        self._win_tokens = 0
        self._win_flops = 0.0
        self._win_start = time.perf_counter()

    def state_dict(self) -> dict:
        return {"total_tokens": self.total_tokens, "total_flops": self.total_flops, "flops_by": dict(self.flops_by)}

    def load_state_dict(self, sd: dict) -> None:
        """A checkpoint's meter; one written before the breakdown existed counts all its FLOPs as training."""
        self.total_tokens = int(sd["total_tokens"])
        self.total_flops = float(sd["total_flops"])
        by = sd.get("flops_by") or {"train": self.total_flops}
        self.flops_by = {c: float(by.get(c, 0.0)) for c in CATEGORIES}

    def add(self, tokens: int, flops_per_token: float) -> None:
        """One training step (or tokens consumed with ``flops_per_token`` 0)."""
        self.total_tokens += tokens
        self.total_flops += tokens * flops_per_token
        self.flops_by["train"] += tokens * flops_per_token
        self._win_tokens += tokens
        self._win_flops += tokens * flops_per_token

    def add_flops(self, flops: float, category: str) -> None:
        """FLOPs computed outside the training steps, in ``category``; charged unless it is "eval"."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown FLOPs category {category!r}; known: {', '.join(CATEGORIES)}")
        self.flops_by[category] += flops
        if category in CHARGED:
            self.total_flops += flops

    def shares(self) -> dict:
        """Each category's FLOPs as a fraction of the charged total (eval's too, though it is not part of it)."""
        total = self.total_flops
        return {c: (f / total if total else 0.0) for c, f in self.flops_by.items()}

    def breakdown(self) -> str:
        """One line: the charged total, the share of each charged category that spent any, and evaluation's."""
        share = self.shares()
        parts = [f"{c} {100 * share[c]:.1f}%" for c in CHARGED if self.flops_by[c] or c == "train"]
        return (f"{self.total_flops:.3e} FLOPs charged ({', '.join(parts)}); evaluation for reporting "
                f"{self.flops_by['eval']:.3e} more ({100 * share['eval']:.1f}%, not charged)")

    def window(self) -> dict:
        """Rates since the previous call; resets the window."""
        dt = max(time.perf_counter() - self._win_start, 1e-9)
        out = {"tokens_per_s": self._win_tokens / dt,
               "mfu": (self._win_flops / dt) / self.peak if self.peak > 0 else 0.0,
               "seconds": dt}
        self._win_tokens, self._win_flops = 0, 0.0
        self._win_start = time.perf_counter()
        return out

    def reset_window(self) -> None:
        self._win_tokens, self._win_flops = 0, 0.0
        self._win_start = time.perf_counter()


class StageStats:
    """Per-stage statistics of a run, one row per stage: its shape, batch shape, world size and peak FLOP/s, and
    the steps, tokens, FLOPs, seconds and last validation loss spent in it. A stage resumed at another world size
    or peak (or grown offline by `nanogrow grow`) gets a row of its own. ``rows`` is what a checkpoint keeps."""

    def __init__(self, world: int, peak: float):
        self.world, self.peak = world, peak  # peak: the run's (ThroughputMeter.peak, all ranks)
        self.rows: list[dict] = []

    def row(self, stage: int, start_step: int, cfg, seq_len: int, micro_batch: int) -> dict:
        """A row of per-stage statistics for a stage of shape ``cfg`` (a ModelConfig), with the shape, world size
        and peak FLOP/s it runs at (MFU of a stage is computed with its own peak, whatever the run's world size
        later)."""
        return {"stage": stage, "start_step": start_step, "params": cfg.num_params(), "seq_len": seq_len,
                "micro_batch": micro_batch, "world": self.world, "peak_flops": self.peak,
                "shape": f"{cfg.n_layer} x {cfg.d_model}, {cfg.d_ff}, {cfg.n_head}/{cfg.n_kv_head}",
                "steps": 0, "tokens": 0, "flops": 0.0, "seconds": 0.0, "val_loss": None}

    def start(self, stage: int, start_step: int, cfg, seq_len: int, micro_batch: int) -> None:
        """A fresh row: stage ``stage`` starts at ``start_step``."""
        self.rows.append(self.row(stage, start_step, cfg, seq_len, micro_batch))

    def add_step(self, tokens: int, flops: float, seconds: float) -> None:
        """One optimizer step of the current stage."""
        st = self.rows[-1]
        st["steps"] += 1
        st["tokens"] += tokens
        st["flops"] += flops
        st["seconds"] += seconds

    def table(self) -> str:
        """The rows as a table (the end of a run with more than one stage)."""
        rows = ["stage | from step | shape (L x d, ff, heads) | seq x mb | world | params | steps | tokens | FLOPs | "
                "tok/s | MFU | val loss"]
        notes = set()
        for st in self.rows:
            peak = st.get("peak_flops") or self.peak  # the stage's own peak (older checkpoints: the run's)
            tps = st["tokens"] / st["seconds"] if st["seconds"] else 0.0
            mfu = st["flops"] / st["seconds"] / peak if st["seconds"] and peak else 0.0
            batch = f"{st.get('seq_len', '?')} x {st.get('micro_batch', '?')}"
            mark = "g" if st.get("offline") else ("r" if st.get("resumed") else "")
            notes.add(mark)
            rows.append(f"{str(st['stage']) + mark:>5} | {st['start_step']:>9} | {st['shape']:<24} | {batch:>8} | "
                        f"{st.get('world', '?'):>5} | "
                        f"{st['params']:>10,} | {st['steps']:>5} | {st['tokens']:>10,} | {st['flops']:.2e} | "
                        f"{tps:>7,.0f} | "
                        f"{100 * mfu:4.1f}% | {fmt(st.get('val_loss'))}")
        if "g" in notes:
            rows.append("g: the same stage after an offline `nanogrow grow` (new shape)")
        if "r" in notes:
            rows.append("r: the same stage resumed at another world size or peak")
        return "\n".join(rows)


def fmt(x) -> str:
    """A loss for a log line or table: 4 decimals, or "-" when there is none."""
    return "-" if x is None else f"{x:.4f}"
