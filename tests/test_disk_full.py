"""A full disk or an I/O error during a save (issue 30): the run stops with one line naming the directory and its
free space, nothing of the failed checkpoint is left to be taken for complete, the previous checkpoint is untouched
and loadable, and a resume from it finishes the run as if nothing had happened. Injected at each write of the save
protocol on one process, at one rank of two under torchrun, and once for real on a small tmpfs where the machine
lets the tests mount one."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanogrow.checkpoint import SaveError, checkpoint_dirs, latest_checkpoint, load_checkpoint, read_meta
from nanogrow.cli import main
from nanogrow.model import ModelConfig, build_model

from helpers import one_thread, tiny_model_toml, tiny_run_config, torchrun  # noqa: F401

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_at(monkeypatch, where: str, after: int = 0) -> None:
    """Make the ``after``-th and later writes of kind ``where`` raise ENOSPC: "tensors" (DCP's file writer, so DCP
    wraps it as it would a real one), "rng" (the per-rank safetensors), "meta" (meta.json, written last)."""
    from torch.distributed.checkpoint import filesystem

    from nanogrow import checkpoint

    calls = {"n": 0}

    def failing(real):
        def f(*a, **k):
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*a, **k)
        return f

    if where == "tensors":
        monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", failing(filesystem.FileSystemWriter.write_data))
    elif where == "rng":
        monkeypatch.setattr(checkpoint, "save_file", failing(checkpoint.save_file))
    elif where == "meta":
        real = Path.write_text
        monkeypatch.setattr(Path, "write_text",
                            lambda self, *a, **k: failing(real)(self, *a, **k) if self.name == "meta.json"
                            else real(self, *a, **k))
    else:
        raise AssertionError(where)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    meta = read_meta(ckpt)
    model = build_model(ModelConfig(**meta["model_config"]), seed=123)
    load_checkpoint(ckpt, model, None, load_rng=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("where", ["tensors", "rng", "meta"])
def test_full_disk_during_a_save_stops_with_one_line_and_keeps_the_last_checkpoint(where, demo_data, tmp_path,
                                                                                   monkeypatch, capsys):
    from nanogrow.train import Trainer

    out = tmp_path / "run"
    cfg = tiny_run_config(demo_data, out, max_steps=8, ckpt_every=4, keep_last=1)
    trainer = Trainer(cfg, log=lambda *_: None)
    for _ in range(4):
        trainer.advance()
    first = trainer.save()
    before = {p.name: p.read_bytes() for p in sorted(first.rglob("*")) if p.is_file()}
    _fail_at(monkeypatch, where)
    for _ in range(4):
        trainer.advance()
    with pytest.raises(SaveError) as e:
        trainer.save()
    msg = str(e.value)
    assert str(out / "ckpt_0000008") in msg and "No space left on device" in msg and "MiB free" in msg
    assert str(first) in msg  # the newest complete checkpoint, named
    assert [p.name for p in out.iterdir() if p.name.startswith("ckpt_")] == ["ckpt_0000004"]  # no .tmp, no rotation
    assert {p.name: p.read_bytes() for p in sorted(first.rglob("*")) if p.is_file()} == before
    _weights(first)  # loads (checksums verified)


def test_full_disk_is_a_one_line_error_and_a_resume_finishes_the_run(demo_data, tmp_path, monkeypatch, capsys):
    """Through the command line: exit code 2 and one line; then, with room again, ``--resume auto`` ends where an
    uninterrupted run ends, bit for bit."""
    def args(out, *extra):
        sets = {"model.n_layer": 2, "model.d_model": 64, "model.n_head": 4, "model.n_kv_head": 2,
                "model.vocab_size": 512, "model.max_seq_len": 64, "data.dir": f"'{demo_data}'", "data.seq_len": 64,
                "train.out_dir": f"'{out}'", "train.micro_batch": 4, "train.max_steps": 8, "train.warmup_steps": 2,
                "train.lr": 0.01, "train.eval_every": 0, "train.eval_batches": 1, "train.log_every": 1000,
                "train.ckpt_every": 4}
        return ["train", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], *extra]

    assert main(args(tmp_path / "whole")) == 0
    with monkeypatch.context() as m:
        _fail_at(m, "tensors", after=1)  # the step-4 save succeeds, the step-8 one does not
        assert main(args(tmp_path / "full")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and "could not write checkpoint" in err, err
    assert [p.name for p in checkpoint_dirs(tmp_path / "full")] == ["ckpt_0000004"]
    assert main(args(tmp_path / "full", "--resume", "auto")) == 0
    whole, resumed = _weights(tmp_path / "whole" / "ckpt_0000008"), _weights(tmp_path / "full" / "ckpt_0000008")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


SAVE_ON_RANK_1_FAILS = """
import errno, os, sys
from torch.distributed.checkpoint import filesystem
real = filesystem.FileSystemWriter.write_data
calls = {"n": 0}
def write_data(self, *a, **k):  # rank 1's second save (step 8) finds the disk full
    calls["n"] += 1
    if int(os.environ["RANK"]) == 1 and calls["n"] > 1:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(self, *a, **k)
filesystem.FileSystemWriter.write_data = write_data
from nanogrow.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_full_disk_on_one_rank_stops_every_rank_without_a_hang(parallel, demo_data, tmp_path):
    """Rank 1 alone fails to write: both ranks learn it (no one waits at a barrier for the other), stop with the
    one-line error, and leave the step-4 checkpoint as the newest; a 2-process resume then finishes the run."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(tiny_model_toml(2).format(data=demo_data) + f"""
[train]
out_dir = "{tmp_path / 'run'}"
parallel = "{parallel}"
micro_batch = 2
max_steps = 8
warmup_steps = 2
lr = 0.01
eval_every = 0
eval_batches = 1
log_every = 1000
ckpt_every = 4
""")
    script = tmp_path / "enospc_rank1.py"
    script.write_text(SAVE_ON_RANK_1_FAILS)
    proc = torchrun(2, script, "train", "--config", cfg, timeout=180, env={"NANOGROW_DIST_TIMEOUT": "60"},
                    check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "could not write checkpoint" in ln]
    assert len(lines) == 2, proc.stderr[-3000:]  # both ranks, one line each
    assert any("No space left on device" in ln for ln in lines) and all("MiB free" in ln for ln in lines)
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("ckpt_")] == ["ckpt_0000004"]
    torchrun(2, "-m", "nanogrow.cli", "train", "--config", cfg, "--resume", "auto", timeout=180)
    assert latest_checkpoint(tmp_path / "run").name == "ckpt_0000008"


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_real_full_tmpfs(demo_data, tmp_path):
    """No injection: a 3 MiB tmpfs takes the run's first checkpoint (2.1 MB) but not the second beside it. A real
    full disk fails inside torch.save's zip writer (a RuntimeError, not an OSError): still the one-line error."""
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("cannot mount a tmpfs here (not root, or not allowed)")
    trainer = None
    try:
        from nanogrow.train import Trainer

        cfg = tiny_run_config(demo_data, disk / "run", max_steps=8, ckpt_every=4, keep_last=2)
        trainer = Trainer(cfg, log=lambda *_: None)
        for _ in range(4):
            trainer.advance()
        first = trainer.save()
        for _ in range(4):
            trainer.advance()
        with pytest.raises(SaveError, match=r"could not write checkpoint .*ckpt_0000008.*MiB free"):
            trainer.save()
        assert [p.name for p in checkpoint_dirs(disk / "run")] == ["ckpt_0000004"]
        assert not any(p.name.endswith(".tmp") for p in (disk / "run").iterdir())
        _weights(first)
        assert load_file(str(first / "rng" / "rank_00000.safetensors"))["cpu"].numel() > 0
    finally:  # a run stopped by an error keeps its out_dir lock and metrics file open until its process ends
        if trainer is not None:
            from nanogrow import run_lock

            trainer.trackers.close()
            run_lock.release(disk / "run")
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # detached now, freed when unused
