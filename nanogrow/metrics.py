"""Throughput accounting: FLOPs accumulated step by step, tokens/s, and model FLOPs utilisation (MFU).

Growth changes FLOPs per token mid-run, so FLOPs are *accumulated* from each step's own shape (OLMo-core's lesson),
never computed as steps x a constant. MFU divides achieved model FLOPs/s by the device peak: a table for known GPUs,
and on CPU a peak measured once by a large matmul probe (what this machine can actually do in fp32).
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


class ThroughputMeter:
    """Accumulates tokens and model FLOPs per step and reports rates over the last logging window."""

    def __init__(self, peak_flops: float, world_size: int = 1):
        self.peak = peak_flops * world_size
        self.total_tokens = 0
        self.total_flops = 0.0
        self._win_tokens = 0
        self._win_flops = 0.0
        self._win_start = time.perf_counter()

    def state_dict(self) -> dict:
        return {"total_tokens": self.total_tokens, "total_flops": self.total_flops}

    def load_state_dict(self, sd: dict) -> None:
        self.total_tokens = int(sd["total_tokens"])
        self.total_flops = float(sd["total_flops"])

    def add(self, tokens: int, flops_per_token: float) -> None:
        self.total_tokens += tokens
        self.total_flops += tokens * flops_per_token
        self._win_tokens += tokens
        self._win_flops += tokens * flops_per_token

    def add_flops(self, flops: float) -> None:
        """FLOPs spent outside training steps that still count toward the run's budget (e.g. LAG candidates)."""
        self.total_flops += flops

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
