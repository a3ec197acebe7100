"""The trainer under torchrun (gloo, 2 CPU processes): FSDP2 and DDP training with an in-place growth event match
one process on the same global batch, and a checkpoint written at 2 processes resumes at 1."""

import json
import shutil
import sys
from pathlib import Path

import pytest

import helpers
from helpers import TORCHRUN, tiny_model_toml

pytestmark = pytest.mark.slow  # every test here launches torchrun

CONFIG = tiny_model_toml(n_layer=1) + """
[train]
out_dir = "{out}"
micro_batch = {mb}
max_steps = 8
warmup_steps = 2
lr = 0.01
eval_every = 4
eval_batches = 2
eval_batch_size = 4
log_every = 4
parallel = "{parallel}"

[growth]
optimizer = "map+age"
lr_policy = "rewarm"
rewarm_steps = 2

[[stage]]
at_step = 3
shape = {{ n_layer = 2, d_ff = 256 }}
op = "joint"
options = {{ depth_op = "stack", width_op = "zero" }}
"""


def write_config(tmp_path, data, name, mb, parallel):
    p = tmp_path / f"{name}.toml"
    p.write_text(CONFIG.format(data=data, out=tmp_path / name, mb=mb, parallel=parallel))
    return p


def run(cmd, timeout=240):
    return helpers.run(cmd, timeout=timeout).stdout


def val_losses(out_dir):
    ckpt = sorted(Path(out_dir).glob("ckpt_*"))[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    return [h["val_loss"] for h in meta["history"] if h["event"] == "eval"], meta


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_process_training_with_growth_matches_one_process(demo_data, tmp_path, parallel):
    one = write_config(tmp_path, demo_data, "one", 4, "none")
    two = write_config(tmp_path, demo_data, "two", 2, parallel)
    run([sys.executable, "-m", "nanogrow.cli", "train", "--config", str(one)])
    out = run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "nanogrow.cli", "train", "--config",
               str(two)])
    assert "grow -> stage 1 at step 3" in out
    a, meta_one = val_losses(tmp_path / "one")
    b, meta_two = val_losses(tmp_path / "two")
    assert meta_two["world_size"] == 2 and meta_two["model_config"]["n_layer"] == 2
    assert len(a) == len(b) == 2
    # same global batch, same growth; only the order of floating-point reductions differs
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)


def test_fsdp_checkpoint_resumes_at_one_process(demo_data, tmp_path):
    two = write_config(tmp_path, demo_data, "run", 2, "fsdp")
    run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "nanogrow.cli", "train", "--config", str(two)])
    one = write_config(tmp_path, demo_data, "run", 4, "none")
    out = run([sys.executable, "-m", "nanogrow.cli", "train", "--config", str(one), "--set", "train.max_steps=10",
               "--resume", "auto"])
    assert "resumed from" in out and "stage 1" in out
    losses, meta = val_losses(tmp_path / "run")
    assert meta["step"] == 10 and meta["world_size"] == 1 and losses[-1] < 6.0


GLOBAL_BATCH_CONFIG = tiny_model_toml(n_layer=1) + """
[train]
out_dir = "{out}"
micro_batch = 2
global_batch = 8
max_steps = 8
warmup_steps = 2
lr = 0.01
eval_every = 4
eval_batches = 2
eval_batch_size = 4
log_every = 1
"""


def test_global_batch_is_kept_across_a_2_to_1_process_resume(demo_data, tmp_path):
    """train.global_batch = 8 sequences: 2 processes x micro_batch 2 x 2 micro-steps (gradients reduced on the
    last only), then 1 process x 2 x 4 after the resume; the run matches one that never left one process."""
    from nanogrow.tracking import read_metrics

    cfg = tmp_path / "gb.toml"
    cfg.write_text(GLOBAL_BATCH_CONFIG.format(data=demo_data, out=tmp_path / "run"))
    ref = tmp_path / "ref.toml"
    ref.write_text(GLOBAL_BATCH_CONFIG.format(data=demo_data, out=tmp_path / "ref"))
    run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "nanogrow.cli", "train", "--config", str(cfg),
         "--set", "train.ckpt_every=4"])
    shutil.rmtree(tmp_path / "run" / "ckpt_0000008")  # resume from step 4, at 1 process
    out = run([sys.executable, "-m", "nanogrow.cli", "train", "--config", str(cfg), "--resume", "auto"])
    assert "resumed from" in out and "512 tokens/step" in out
    run([sys.executable, "-m", "nanogrow.cli", "train", "--config", str(ref)])
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(r["tokens"] == r["step"] * 8 * 64 for r in steps)  # 512 tokens per step at 2 processes and at 1
    # the stage's statistics are split where the world size changed, each part with its own world and peak
    stages = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]
    assert [(s["world"], s["start_step"], s["steps"], bool(s.get("resumed"))) for s in stages] == \
        [(2, 0, 4, False), (1, 4, 4, True)]
    assert stages[0]["peak_flops"] > 0 and stages[1]["peak_flops"] > 0
    a, _ = val_losses(tmp_path / "run")
    b, _ = val_losses(tmp_path / "ref")
    assert len(a) == len(b) == 2 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)


def test_accelerate_launch_trains_like_torchrun(demo_data, tmp_path):
    """`accelerate launch` is a launcher here (it sets torchrun's environment): the same 2-process run, the same
    losses, bit for bit."""
    pytest.importorskip("accelerate")
    accelerate = Path(sys.executable).with_name("accelerate")
    losses = {}
    for name, launcher in (("torchrun", [str(TORCHRUN), "--standalone", "--nproc_per_node=2"]),
                           ("accelerate", [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2",
                                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                                           "no", "--main_process_port", "0"])):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(GLOBAL_BATCH_CONFIG.format(data=demo_data, out=tmp_path / name))
        out = run(launcher + ["-m", "nanogrow.cli", "train", "--config", str(cfg), "--set", "train.max_steps=4"])
        assert "2 process(es)" in out, out
        from nanogrow.tracking import read_metrics
        losses[name] = [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path / name)]
    assert losses["accelerate"] == losses["torchrun"] and len(losses["torchrun"]) >= 5
