"""What a run leaves behind for people and tools: a log flushed line by line (also to train.log), metrics.jsonl with
every logged step, evaluation and growth event, the same records in TensorBoard / wandb, and loss.png."""

import importlib.machinery
import json
import os
import subprocess
import sys
import time
import types

import pytest

from nanogrow.cli import main
from nanogrow.config import ConfigError, load_config
from nanogrow.tracking import read_metrics
from nanogrow.train import Trainer

import helpers
from helpers import tiny_run_config, with_stages

QUIET = lambda *a, **k: None  # noqa: E731


def grown_run(data, out, **train):
    """12 steps, one growth event at step 6, evaluation every 4 steps, a log line every 2."""
    cfg = tiny_run_config(data, out, eval_every=4, log_every=2, **train)
    return with_stages(cfg, [{"at_step": 6, "shape": {"n_layer": 3}}], rewarm_steps=2)


def test_log_reaches_a_redirected_file_while_the_run_is_going(demo_data, tmp_path):
    """Python block-buffers stdout when it is a file (SLURM --output, nohup, > log): the first lines must be in
    the file while training still runs, not when the process ends."""
    args = {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2, "model.n_kv_head": 1,
            "model.vocab_size": 512, "model.max_seq_len": 32, "data.dir": f"'{demo_data}'", "data.seq_len": 32,
            "train.out_dir": f"'{tmp_path / 'run'}'", "train.micro_batch": 2, "train.max_steps": 10**6,
            "train.warmup_steps": 1, "train.eval_every": 0, "train.log_every": 10**6}
    cmd = [sys.executable, "-m", "nanogrow.cli", "train"] + [x for k, v in args.items() for x in ("--set", f"{k}={v}")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["OMP_NUM_THREADS"] = "1"
    log = tmp_path / "slurm.out"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=helpers.ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 90
        while "model:" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        running = proc.poll() is None
        assert "model:" in log.read_text() and running, log.read_text()[-2000:]
        assert "model:" in (tmp_path / "run" / "train.log").read_text()
    finally:
        proc.kill()
        proc.wait()


def test_metrics_jsonl_has_steps_evals_and_growth_events(demo_data, tmp_path):
    trainer = Trainer(grown_run(demo_data, tmp_path), log=QUIET)
    trainer.run()
    records = read_metrics(tmp_path)
    kinds = [r["kind"] for r in records]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    assert set(train[0]) >= {"step", "tokens", "flops", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "stage",
                             "params"}
    assert all(r["tokens"] == r["step"] * 4 * 64 for r in train)
    assert [r["stage"] for r in train] == [0, 0, 0, 1, 1, 1] and train[3]["params"] > train[0]["params"]
    assert all(r["grad_norm"] > 0 and r["flops"] > 0 for r in train)
    # FLOPs accumulate with each stage's own cost per token
    assert train[-1]["flops"] == pytest.approx(trainer.meter.total_flops)
    grow = [r for r in records if r["kind"] == "grow"]
    assert len(grow) == 1 and grow[0]["step"] == 6 and grow[0]["op"] == "stack"
    assert grow[0]["params_after"] > grow[0]["params_before"]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8, 12]
    assert records[kinds.index("grow") - 1] == train[2]  # right after the step-6 line, before step 7 is trained
    log = (tmp_path / "train.log").read_text()
    assert "grow -> stage 1 at step 6" in log and "done: 12 steps" in log
    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_resume_keeps_metrics_up_to_the_checkpoint_and_a_fresh_run_starts_them_anew(demo_data, tmp_path):
    cfg = grown_run(demo_data, tmp_path)
    Trainer(cfg, log=QUIET).run()  # checkpoints at 6 (growth) and 12
    first = read_metrics(tmp_path)
    (tmp_path / "ckpt_0000012").rename(tmp_path / "gone")  # resume from the growth checkpoint at step 6
    resumed = Trainer(grown_run(demo_data, tmp_path), resume="auto", log=QUIET)
    assert resumed.step == 6
    assert read_metrics(tmp_path) == [r for r in first if r["step"] <= 6]
    resumed.run()
    again = read_metrics(tmp_path)
    assert [(r["kind"], r["step"]) for r in again] == [(r["kind"], r["step"]) for r in first]
    Trainer(grown_run(demo_data, tmp_path), log=QUIET, overwrite=True)
    assert read_metrics(tmp_path) == [] and "done:" not in (tmp_path / "train.log").read_text()


def test_tensorboard_gets_steps_tokens_and_flops_axes(demo_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(grown_run(demo_data, tmp_path, tensorboard=True, plot=False), log=QUIET).run()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/grad_norm", "train/mfu", "eval/val_loss", "by_tokens/train_loss",
                "by_gflops/eval_val_loss", "grow/stage"):
        assert tag in tags, (tag, tags)
    assert [e.step for e in acc.Scalars("by_tokens/train_loss")] == [s * 4 * 64 for s in (2, 4, 6, 8, 10, 12)]
    assert [(e.step, e.value) for e in acc.Scalars("grow/stage")] == [(6, 1.0)]


def test_wandb_gets_project_run_name_and_the_same_records(demo_data, tmp_path, monkeypatch):
    calls = {"log": [], "metrics": []}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finished"] = True

    stub = types.ModuleType("wandb")
    stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    stub.init = lambda **kw: calls.update(init=kw) or Run()
    stub.define_metric = lambda name, **kw: calls["metrics"].append(name)
    monkeypatch.setitem(sys.modules, "wandb", stub)
    cfg = grown_run(demo_data, tmp_path, wandb=True, wandb_project="growth", run_name="r1", plot=False)
    Trainer(cfg, log=QUIET).run()
    assert calls["init"]["project"] == "growth" and calls["init"]["name"] == "r1"
    assert calls["init"]["config"]["train"]["max_steps"] == 12 and calls["finished"]
    assert set(calls["metrics"]) == {"tokens", "flops"}
    steps = [(s, d) for s, d in calls["log"] if "train/loss" in d]
    assert [s for s, _ in steps] == [2, 4, 6, 8, 10, 12] and steps[0][1]["tokens"] == 2 * 4 * 64
    assert any("grow/params_after" in d and s == 6 for s, d in calls["log"])


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_a_requested_tracker_that_is_missing_fails_at_start(tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed
    with pytest.raises(ConfigError, match=rf"train.{tracker}=true needs the {tracker} package.*nanogrow\[{tracker}\]"):
        load_config(None, [f"train.{tracker}=true"])


def test_nanogrow_plot_overlays_runs(demo_data, tmp_path, capsys):
    for name in ("a", "b"):
        Trainer(grown_run(demo_data, tmp_path / name, plot=False), log=QUIET).run()
    out = tmp_path / "both.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and f"wrote {out}" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_summary_stage_rows_carry_world_and_peak(demo_data, tmp_path):
    trainer = Trainer(grown_run(demo_data, tmp_path, plot=False), log=QUIET)
    summary = trainer.run()
    assert [s["world"] for s in summary["stages"]] == [1, 1]
    assert all(s["peak_flops"] == trainer.meter.peak for s in summary["stages"])
    assert json.loads((tmp_path / "summary.json").read_text())["stages"][1]["shape"].startswith("3 x 64")
