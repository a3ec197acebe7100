"""Growth inside the training loop: stage boundaries, events, forced checkpoints, exact resume across growth."""

import pytest
import torch

from nanogrow.config import ConfigError, load_config, validate
from nanogrow.model import ModelConfig
from nanogrow.schedule import exponential_shapes, stage_start_steps
from nanogrow.train import Trainer

from helpers import run_steps, tiny_run_config, with_stages

QUIET = lambda *_: None  # noqa: E731


def grown_config(data_dir, out_dir, **train):
    cfg = tiny_run_config(data_dir, out_dir, **train)
    cfg.model.n_layer = 1
    return with_stages(cfg, [
        {"shape": {"n_layer": 2}, "op": "stack", "at_step": 3},
        {"shape": {"d_ff": 256}, "op": "msg", "options": {"fade_steps": 3}, "at_step": 6, "micro_batch": 2},
        {"shape": {"n_layer": 3}, "op": "identity", "at_tokens": 6 * 256 + 3 * 128},
    ], lr_policy="rewarm", rewarm_steps=3, optimizer="map+age")


def test_stages_grow_at_their_boundaries_and_log_events(demo_data, tmp_path):
    trainer = Trainer(grown_config(demo_data, tmp_path), log=QUIET)
    run_steps(trainer, 12)
    events = [h for h in trainer.history if h["event"] == "grow"]
    assert [e["step"] for e in events] == [3, 6, 9]
    assert trainer.model_config.n_layer == 3 and trainer.model_config.d_ff == 256
    assert events[0]["params_after"] > events[0]["params_before"]
    # function-preserving operators keep the validation loss through the event
    assert events[1]["val_loss_after"] == pytest.approx(events[1]["val_loss_before"], abs=1e-5)
    assert events[2]["val_loss_after"] == pytest.approx(events[2]["val_loss_before"], abs=1e-5)
    assert trainer.micro_batch == 2
    assert [s["steps"] for s in trainer.stage_stats.rows] == [3, 3, 3, 3]
    assert trainer.stage_stats.rows[3]["tokens"] == 3 * 2 * 64
    assert {p.name for p in tmp_path.glob("ckpt_*")} >= {"ckpt_0000009"}  # forced checkpoint at the last event
    assert trainer.ramp is None and trainer.model.layers["0"].mlp.unit_mask is None  # fade-in over after 3 steps


@pytest.mark.parametrize("stop_at", [4, 7])  # after the first growth; in the middle of the masked fade-in
def test_resume_after_growth_matches_uninterrupted_run(demo_data, tmp_path, stop_at):
    full = Trainer(grown_config(demo_data, tmp_path / "full"), log=QUIET)
    full_losses = run_steps(full, 12)

    first = Trainer(grown_config(demo_data, tmp_path / "split"), log=QUIET)
    run_steps(first, stop_at)
    first.save()
    del first
    second = Trainer(grown_config(demo_data, tmp_path / "split"), resume="auto", log=QUIET)
    assert second.step == stop_at
    losses = run_steps(second, 12 - stop_at)
    assert losses == full_losses[stop_at:]
    a, b = full.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = full.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for name in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name])), (i, name)
    assert full.loader.state_dict() == second.loader.state_dict()


def test_equal_flops_schedule_places_boundaries():
    # stage k gets weight 1/(tokens_per_step * flops_per_token): cheaper stages get more steps
    starts = stage_start_steps("equal-flops", 300, [100, 100, 100], [1.0, 2.0, 4.0])
    assert starts == [171, 257]
    assert stage_start_steps("equal-tokens", 300, [100, 100, 100], [1, 2, 4]) == [100, 200]
    assert stage_start_steps("exponential", 70, [10, 10, 10], [1, 1, 1], exp_ratio=2.0) == [10, 30]
    with pytest.raises(ValueError, match="gives stage"):
        stage_start_steps("equal-tokens", 2, [1, 1, 1, 1], [1, 1, 1, 1])


def test_exponential_shapes_grow_geometrically():
    shapes = exponential_shapes(ModelConfig(d_model=64, d_ff=128), ModelConfig(d_model=64, d_ff=512), 2)
    assert [s.d_ff for s in shapes] == [128, 256, 512]


def test_budgeted_schedule_in_trainer(demo_data, tmp_path):
    cfg = grown_config(demo_data, tmp_path)
    for st in cfg.stage:
        st.at_step = st.at_tokens = -1
    cfg.growth.schedule = "equal-tokens"
    validate(cfg)
    trainer = Trainer(cfg, log=QUIET)
    # tokens/step: 256, 256, 128 (micro_batch 2), 128 -> weights 1/256, 1/256, 1/128, 1/128 over 12 steps
    assert trainer.growth.starts == [{"at_step": 2}, {"at_step": 4}, {"at_step": 8}]


@pytest.mark.parametrize("stage,match", [
    ({"shape": {"n_layer": 1}, "op": "stack", "at_step": 3}, r"stage\[1\] \(op 'stack'\)"),
    ({"shape": {"n_layer": 4}, "op": "stak", "at_step": 3}, r"unknown growth operator 'stak'"),
    ({"shape": {"n_layer": 4}, "op": "stack", "options": {"fade": 3}, "at_step": 3}, r"unknown option 'fade'"),
    ({"shape": {"n_head": 3}, "op": "zero", "at_step": 3}, r"stage\[1\]"),
    ({"shape": {"n_layerz": 4}, "at_step": 3}, r"stage\[1\].shape has unknown key 'n_layerz'"),
    ({"shape": {"n_layer": 4}}, r"stage\[1\] needs exactly one of at_step"),
    ({"shape": {"n_layer": 4}, "at_step": 3, "optimizer": "keep"}, r"stage\[1\].optimizer='keep'"),
])
def test_bad_stage_is_refused_before_training(tmp_path, stage, match):
    cfg_file = tmp_path / "c.toml"
    import json
    opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in stage.get("options", {}).items())
    shape = ", ".join(f"{k} = {v}" for k, v in stage["shape"].items())
    lines = ["[model]", "n_layer = 2", "d_model = 64", "n_head = 4", "n_kv_head = 2", "[[stage]]",
             f"shape = {{ {shape} }}"]
    for k, v in stage.items():
        if k not in ("shape", "options"):
            lines.append(f"{k} = {json.dumps(v)}")
    if opts:
        lines.append(f"options = {{ {opts} }}")
    cfg_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=match):
        load_config(cfg_file)


def test_grow_checkpoint_offline_then_resume(demo_data, tmp_path, capsys):
    from nanogrow.checkpoint import read_meta
    from nanogrow.cli import main

    cfg = tiny_run_config(demo_data, tmp_path / "small")
    cfg.model.n_layer = 1
    trainer = Trainer(cfg, log=QUIET)
    [trainer.train_step() for _ in range(3)]
    path = trainer.save()
    rc = main(["grow", str(path), "--to", "n_layer=2,d_ff=256", "--op", "joint", "--options",
               '{"depth_op": "stack", "width_op": "zero"}', "--out", str(tmp_path / "big")])
    assert rc == 0
    grown = tmp_path / "big" / "ckpt_0000003"
    meta = read_meta(grown)
    assert meta["model_config"]["n_layer"] == 2 and meta["model_config"]["d_ff"] == 256
    assert meta["history"][-1]["event"] == "grow" and meta["history"][-1]["plan"]["op"] == "joint"
    # continue training from the grown checkpoint: same data position, grown model, mapped optimizer state
    cfg2 = tiny_run_config(demo_data, tmp_path / "big")
    cfg2.model.n_layer = 1
    resumed = Trainer(cfg2, resume="auto", log=QUIET)
    assert resumed.step == 3 and resumed.model_config.n_layer == 2
    assert resumed.loader.state_dict() == trainer.loader.state_dict()
    w = resumed.model.state_dict()
    assert torch.equal(w["layers.0.attn.wq.weight"], w["layers.1.attn.wq.weight"])  # stack copied layer 0
    st = resumed.optimizer.state[resumed.model.layers["1"].attn.wq.weight]
    assert torch.equal(st["exp_avg"], trainer.optimizer.state[trainer.model.layers["0"].attn.wq.weight]["exp_avg"])
    assert [resumed.train_step() for _ in range(2)]
    # the stage statistics describe the grown model from the growth on (its own row, marked g in the table)
    rows = resumed.stage_stats.rows
    assert [(r["stage"], r["steps"], r["shape"][:1], bool(r.get("offline"))) for r in rows] == \
        [(0, 3, "1", False), (0, 2, "2", True)]
    assert rows[1]["params"] == resumed.model_config.num_params() > rows[0]["params"]
    assert "\n   0g | " in resumed.stage_stats.table()


def test_grow_cli_rejects_bad_input_before_writing(demo_data, tmp_path, capsys):
    from nanogrow.cli import main

    cfg = tiny_run_config(demo_data, tmp_path / "small")
    trainer = Trainer(cfg, log=QUIET)
    trainer.train_step()
    path = trainer.save()
    assert main(["grow", str(path), "--to", "n_layer=1", "--op", "stack", "--out", str(tmp_path / "o")]) == 2
    assert "n_layer" in capsys.readouterr().err
    assert main(["grow", str(path), "--to", "n_layer=4", "--op", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown growth operator 'nope'" in capsys.readouterr().err
    assert main(["grow", str(path), "--to", "n_layers=4", "--op", "stack", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def held_config(data_dir, out_dir):
    cfg = tiny_run_config(data_dir, out_dir)
    cfg.model.n_layer = 1
    return with_stages(cfg, [{"shape": {"n_layer": 2}, "op": "stack", "at_step": 3}],
                       new_lr_mult=2.0, new_wd_steps=4)


def test_new_parameter_lr_and_decay_hold_in_training_and_across_resume(demo_data, tmp_path):
    full = Trainer(held_config(demo_data, tmp_path / "full"), log=QUIET)
    run_steps(full, 5)
    wq = full.model.layers["1"].attn.wq.weight
    assert float(full.optimizer.state[wq]["wd_scale"].max()) == 0.0
    assert bool((full.optimizer.state[wq]["lr_scale"] == 2.0).all())
    run_steps(full, 7)  # the hold ends 4 steps after the growth at step 3; the lr multiplier stays
    assert "wd_scale" not in full.optimizer.state[wq] and "lr_scale" in full.optimizer.state[wq]
    first = Trainer(held_config(demo_data, tmp_path / "split"), log=QUIET)
    run_steps(first, 5)
    first.save()
    second = Trainer(held_config(demo_data, tmp_path / "split"), resume="auto", log=QUIET)
    assert "wd_scale" in second.optimizer.state[second.model.layers["1"].attn.wq.weight]
    run_steps(second, 7)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k


def test_new_parameter_scales_refuse_reset_and_sharded_backends(demo_data, tmp_path):
    cfg = tiny_run_config(demo_data, tmp_path)
    cfg.model.n_layer = 1
    with pytest.raises(ConfigError, match="reset"):
        with_stages(cfg, [{"shape": {"n_layer": 2}, "at_step": 3}], new_lr_mult=2.0, optimizer="reset")
    cfg.train.parallel = "fsdp"
    with pytest.raises(ConfigError, match="fsdp"):
        with_stages(cfg, [{"shape": {"n_layer": 2}, "at_step": 3}], new_wd_steps=5)
