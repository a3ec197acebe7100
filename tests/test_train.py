import dataclasses
import json
import shutil

import pytest
import torch

from nanogrow.checkpoint import CheckpointError, latest_checkpoint
from nanogrow.cli import main
from nanogrow.data import DataError
from nanogrow.train import Trainer, lr_at

from helpers import tiny_run_config, with_stages


def test_loss_decreases_on_demo_corpus(demo_data, tmp_path):
    cfg = tiny_run_config(demo_data, tmp_path, max_steps=60, eval_every=0)
    trainer = Trainer(cfg, log=lambda *_: None)
    before = trainer.evaluate()
    summary = trainer.run()
    assert before > 6.0  # ~ln(512) at init
    assert summary["val_loss"] < before - 1.0
    assert summary["tokens"] == 60 * 4 * 64
    assert summary["flops"] == pytest.approx(60 * 4 * 64 * cfg.model.flops_per_token(64))


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resume_matches_uninterrupted_run(demo_data, tmp_path):
    quiet = lambda *_: None  # noqa: E731
    full = Trainer(tiny_run_config(demo_data, tmp_path / "full", grad_accum=2), log=quiet)
    full_losses = [full.train_step() for _ in range(12)]

    first = Trainer(tiny_run_config(demo_data, tmp_path / "split", grad_accum=2), log=quiet)
    [first.train_step() for _ in range(6)]
    first.save()
    del first
    second = Trainer(tiny_run_config(demo_data, tmp_path / "split", grad_accum=2), resume="auto", log=quiet)
    assert second.step == 6
    resumed_losses = [second.train_step() for _ in range(6)]

    assert resumed_losses == full_losses[6:]
    a, b = _weights(full), _weights(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = full.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    for i in sa:
        for name in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name])), (i, name)


def test_cli_train_runs_and_resume_auto_continues(demo_data, tmp_path, capsys):
    args = ["train", "--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
            "--set", "model.n_kv_head=1", "--set", "model.vocab_size=512", "--set", "model.max_seq_len=32",
            "--set", f"data.dir='{demo_data}'", "--set", "data.seq_len=32", "--set", f"train.out_dir='{tmp_path}'",
            "--set", "train.micro_batch=2", "--set", "train.warmup_steps=1", "--set", "train.eval_batches=1",
            "--set", "train.log_every=2", "--set", "train.eval_every=2"]
    assert main(args + ["--set", "train.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "mfu" in out and "val loss" in out
    assert latest_checkpoint(tmp_path).name == "ckpt_0000004"
    assert main(args + ["--set", "train.max_steps=6", "--resume", "auto"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
    assert latest_checkpoint(tmp_path).name == "ckpt_0000006"


def test_checkpoints_keep_last_and_ignore_partial_saves(demo_data, tmp_path):
    trainer = Trainer(tiny_run_config(demo_data, tmp_path, keep_last=2, max_steps=4), log=lambda *_: None)
    for _ in range(3):
        trainer.train_step()
        trainer.save()
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_0000002", "ckpt_0000003"]
    # a crash in the middle of a save leaves only a .tmp directory, which is never taken for a checkpoint
    shutil.copytree(tmp_path / "ckpt_0000003", tmp_path / "ckpt_0000009.tmp")
    assert latest_checkpoint(tmp_path).name == "ckpt_0000003"


def test_incomplete_checkpoint_is_a_clear_error(demo_data, tmp_path):
    trainer = Trainer(tiny_run_config(demo_data, tmp_path), log=lambda *_: None)
    trainer.train_step()
    path = trainer.save()
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt_0000001.*incomplete: no meta.json"):
        Trainer(tiny_run_config(demo_data, tmp_path), resume=str(path))


def test_checkpoint_of_another_shape_is_refused_and_left_untouched(demo_data, tmp_path):
    trainer = Trainer(tiny_run_config(demo_data, tmp_path), log=lambda *_: None)
    trainer.train_step()
    path = trainer.save()
    before = {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    cfg = tiny_run_config(demo_data, tmp_path)
    cfg.model.d_model = 128
    with pytest.raises(CheckpointError, match=r"another model shape \(model.d_model: checkpoint 64 vs config 128"):
        Trainer(cfg, resume="auto")
    assert {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before


def test_empty_data_dir_fails_before_any_compute(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "data")):
        Trainer(tiny_run_config(tmp_path / "data", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_vocab_too_small_for_data_is_refused(demo_data, tmp_path):
    cfg = tiny_run_config(demo_data, tmp_path)
    cfg.model.vocab_size = 100
    with pytest.raises(DataError, match="vocab"):
        Trainer(cfg)


def test_lr_schedules():
    cfg = tiny_run_config("x", "y", max_steps=100, warmup_steps=10, lr=1.0)
    t = cfg.train
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(99, t) == pytest.approx(t.min_lr_ratio, abs=1e-3)
    t.schedule = "wsd"
    assert lr_at(50, t) == 1.0 and lr_at(100, t) == pytest.approx(t.min_lr_ratio)


def test_resume_applies_the_configs_optimizer_settings(demo_data, tmp_path):
    trainer = Trainer(tiny_run_config(demo_data, tmp_path, weight_decay=0.1, beta2=0.95), log=lambda *_: None)
    trainer.train_step()
    trainer.save()
    resumed = Trainer(tiny_run_config(demo_data, tmp_path, weight_decay=0.0, beta2=0.99), resume="auto",
                      log=lambda *_: None)
    groups = resumed.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0] and all(g["betas"] == (0.9, 0.99) for g in groups)


def test_checkpoint_before_the_first_step_keeps_step_zero(demo_data, tmp_path):
    trainer = Trainer(tiny_run_config(demo_data, tmp_path), log=lambda *_: None)
    trainer.save()  # DCP must not take a zero-gradient step to create the optimizer state
    assert all(float(s["step"]) == 0.0 for s in trainer.optimizer.state.values())
    resumed = Trainer(tiny_run_config(demo_data, tmp_path), resume="auto", log=lambda *_: None)
    assert all(float(s["step"]) == 0.0 for s in resumed.optimizer.state.values())
    fresh = Trainer(tiny_run_config(demo_data, tmp_path / "fresh"), log=lambda *_: None)
    assert resumed.train_step() == fresh.train_step()


def test_max_flops_budget_is_spent_through_a_growth_and_on_resume(demo_data, tmp_path):
    """train.max_flops: the step count is planned at the start through the known growth step (6 steps at 2 layers,
    the rest at 4), re-derived after the growth, so the run spends the budget to within half a step of the grown
    model; a resumed run derives the same count."""
    import dataclasses

    from helpers import with_stages

    small = tiny_run_config(demo_data, tmp_path).model  # 2 layers
    per_step_small = 4 * 64 * small.flops_per_token(64)
    per_step_big = 4 * 64 * dataclasses.replace(small, n_layer=4).flops_per_token(64)

    def config():
        return with_stages(tiny_run_config(demo_data, tmp_path / "a", max_steps=10, max_flops=30 * per_step_small),
                           [{"at_step": 6, "shape": {"n_layer": 4}}])

    trainer = Trainer(config(), log=lambda *_: None)
    planned = 6 + round(24 * per_step_small / per_step_big)  # not 30: the last 24 steps' worth runs at 4 layers
    assert trainer.max_steps == planned  # train.max_steps = 10 is replaced by what the budget buys
    summary = trainer.run()
    assert summary["steps"] == planned < 30
    assert abs(summary["flops"] - 30 * per_step_small) <= per_step_big / 2
    resumed = Trainer(config(), resume=str(sorted((tmp_path / "a").glob("ckpt_*"))[0]), log=lambda *_: None)
    assert resumed.step == 6 and resumed.max_steps == summary["steps"]


def test_curvature_trigger_probes_count_their_flops_and_grow_the_model(demo_data, tmp_path):
    from helpers import with_stages

    cfg = with_stages(tiny_run_config(demo_data, tmp_path, max_steps=40),
                      [{"shape": {"n_layer": 4}, "trigger": "curvature",
                        "trigger_options": {"threshold": 2.0, "every": 4, "window": 2, "min_steps": 0}}])
    trainer = Trainer(cfg, log=lambda *_: None)
    for _ in range(8):
        trainer.train_step()
    fpt = cfg.model.flops_per_token(64)
    assert trainer.trigger.probes == 2 and trainer.trigger.last_kappa is not None
    assert trainer.meter.total_flops == pytest.approx(8 * 256 * fpt + 2 * 256 * fpt / 3)
    assert trainer.meter.flops_by["probe"] == pytest.approx(2 * 256 * fpt / 3)  # charged, in its own category
    assert trainer.meter.flops_by["train"] == pytest.approx(8 * 256 * fpt)
    assert trainer.growth.due()  # kappa < 2 always: fires once the window is full
    trainer.growth.grow_next_stage()
    assert trainer.model_config.n_layer == 4
    event = trainer.history[-1]
    assert event["trigger"]["kind"] == "curvature" and event["trigger"]["probes"] == 2


def test_stages_past_max_steps_are_named_and_warmup_is_fitted(demo_data, tmp_path):
    from helpers import with_stages

    lines = []
    cfg = with_stages(tiny_run_config(demo_data, tmp_path, max_steps=8, warmup_steps=20),
                      [{"at_step": 4, "shape": {"n_layer": 3}}, {"at_step": 8, "shape": {"n_layer": 4}},
                       {"at_tokens": 10**6, "shape": {"n_layer": 5}}], rewarm_steps=2)
    trainer = Trainer(cfg, log=lines.append)
    text = "\n".join(lines)
    assert "warmup_steps=20 is not below train.max_steps=8; warming up over 0 steps" in text
    assert trainer.t.warmup_steps == 0
    assert ("train.max_steps=8 ends before stage 2 (at_step 8), stage 3 (at_tokens 1e+06) would start: they will "
            "never run") in text
    assert "stage 1" not in text.split("ends before")[1]


def test_global_batch_derives_accumulation(demo_data, tmp_path):
    trainer = Trainer(tiny_run_config(demo_data, tmp_path, global_batch=12, micro_batch=4), log=lambda *_: None)
    assert trainer.batch.grad_accum == 3 and trainer.tokens_per_step() == 12 * 64
    trainer.train_step()
    assert trainer.meter.total_tokens == 12 * 64


def test_the_run_config_is_frozen_and_the_callers_stays_its_own(demo_data, tmp_path):
    """The Trainer validates and freezes a copy: a part of the run that assigns a config field fails loudly, and
    what the run derives (accumulation, a budget's steps, the warm-up) lives in its batch layout or its copy."""
    cfg = with_stages(tiny_run_config(demo_data, tmp_path, global_batch=12, micro_batch=4),
                      [{"at_step": 2, "shape": {"n_layer": 3}}])
    trainer = Trainer(cfg, log=lambda *_: None)
    for section, field in ((trainer.t, "grad_accum"), (trainer.t, "max_steps"), (trainer.cfg, "stage"),
                           (trainer.cfg.model, "n_layer"), (trainer.cfg.growth, "op"), (trainer.cfg.data, "seq_len"),
                           (trainer.cfg.stage[0], "at_step")):
        with pytest.raises(dataclasses.FrozenInstanceError, match="frozen once the run has validated it"):
            setattr(section, field, getattr(section, field))
    assert trainer.cfg.frozen and trainer.cfg.stage[0].frozen and not cfg.frozen
    cfg.train.max_steps = 3  # the caller's config is its own: still editable, and not the run's
    assert trainer.t.max_steps != 3 and trainer.t.grad_accum == cfg.train.grad_accum == 1
    assert dataclasses.replace(trainer.t, max_steps=3).max_steps == 3  # a changed copy is a new, unfrozen config
