"""The trainer under torchrun (gloo, 2 CPU processes): FSDP2 and DDP training with an in-place growth event match
one process on the same global batch, and a checkpoint written at 2 processes resumes at 1."""

import json
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
