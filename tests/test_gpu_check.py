"""``nanogrow bench gpu`` / ``launch/gpu_check.sh``: the CPU path (says there is no GPU, exits 0) and every section
at toy sizes on CPU, so the GPU-only code is at least imported, called and its table built."""

import os
import subprocess
import sys
import typing
from pathlib import Path

import torch

from nanogrow import gpu_check as G
from nanogrow.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_without_cuda_the_check_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_launch_script_runs_the_cli_command():
    env = dict(os.environ, PYTHON=sys.executable, DRY_RUN="1", PYTHONPATH=str(ROOT))
    p = subprocess.run(["bash", str(ROOT / "launch/gpu_check.sh")], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "-m nanogrow.cli bench gpu" in p.stderr


def test_training_section_runs_each_variant_at_a_toy_shape_on_cpu():
    table = G.Table()
    variants = {k: dict(v, kernels="torch", compile=False) for k, v in G.training_variants(flash=True).items()}
    res = G.training_section(table, device="cpu", dtype="fp32", steps=1, warmup=0, variants=variants,
                             shape=dict(n_layer=1, d_model=32, n_head=2, n_kv_head=1, d_ff=64, vocab_size=64,
                                        max_seq_len=16), batch=dict(micro_batch=2, seq_len=16))
    assert set(res) == {"torch kernels", "triton kernels", "triton + compile", "triton, SDPA (no flash-attn)"}
    assert all(r["tokens_per_s"] > 0 for r in res.values())
    text = table.render()
    assert text.count("tokens/s") == 4 and text.splitlines()[0].startswith("section")


def test_kernel_error_column_compares_the_two_backends():
    """The kernels section's error: zero when both backends are the same code (the torch reference on CPU)."""
    from nanogrow.kernels.bench import llm_cases

    case = next(c for c in llm_cases("cpu", tokens=4, ce_tokens=4, d_models=(16,), vocabs=(32,), head_dim=8)
                if c.name == "swiglu+unit_mask")
    real = case.fn
    case.fn = lambda *a, backend: real(*a, backend="torch")
    assert G._max_err(case, "cpu") == 0.0


def test_growth_section_reads_bench_grow_lines_and_reports_a_failure():
    table = G.Table()
    line = "  stack        7.1M -> 11.3M params | step 100 ms | growth 90 ms = 0.90 steps | peak memory ..."
    G.growth_section(table, command=[sys.executable, "-c", f"print({line!r})"])
    assert table.rows == [("growth (FSDP2, 1 GPU)", "", line.strip())]
    table = G.Table()
    G.growth_section(table, command=[sys.executable, "-c", "raise SystemExit('boom')"])
    assert table.rows[-1][1] == "FAILED" and "boom" in table.rows[-1][2]
    assert G.growth_command()[-4:] == ["--backend", "fsdp", "--steps", "3"]


def test_every_section_is_annotated():
    for fn in (G.gpu_check, G.kernels_section, G.training_section, G.growth_section, G.growth_command):
        hints = typing.get_type_hints(fn)
        assert "return" in hints, fn.__name__
