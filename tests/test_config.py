import pytest

from nanogrow.config import ConfigError, load_config, validate


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_demo_and_gpt2_configs_load():
    for name in ("configs/demo.toml", "configs/gpt2-small.toml", "configs/gpt2-small-grow.toml",
                 "configs/recipe-8x96.toml"):
        cfg = load_config(name)
        assert cfg.model.n_layer > 0


def test_every_handbook_study_loads_and_spends_its_budget():
    """Each shipped study resolves every arm and spends the reference's FLOPs to within a step of its last stage."""
    from nanogrow.handbook.study import budget_check, studies_in

    studies = studies_in()
    assert len(studies) >= 8
    for study in studies:
        for line in budget_check(study):
            if "x budget" in line and "trigger" not in line:
                assert abs(float(line.rsplit(", ", 1)[1].split(" x")[0]) - 1) < 0.01, (study.name, line)


def test_overrides_are_typed():
    cfg = load_config("configs/demo.toml", ["train.max_steps=7", "train.warmup_steps=2", "train.lr=0.01",
                                            "model.tie_embeddings=true"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.01 and cfg.model.tie_embeddings is True


@pytest.mark.parametrize("text,match", [
    ("[train]\nmax_stepz = 3\n", r"unknown key 'train.max_stepz'.*max_steps"),
    ("[trian]\n", r"unknown section \[trian\]"),
    ("[model]\nd_model = 100\nn_head = 3\n", r"model.d_model=100 is not divisible by model.n_head=3"),
    ("[model]\nn_head = 8\nn_kv_head = 3\n", r"model.n_head=8 is not divisible by model.n_kv_head=3"),
    ("[train]\nschedule = 'linear'\n", r"train.schedule='linear' is not one of"),
    ("[train]\nmax_steps = 'ten'\n", r"train.max_steps must be an integer"),
    ("[train]\nlr = -1.0\n", r"train.lr must be > 0"),
    ("[data]\nseq_len = 4096\n", r"data.seq_len=4096 exceeds model.max_seq_len"),
    ("[train\n", r"not valid TOML"),
    ("[train]\nparallel = 'fsdp'\n[growth]\nlr_adapt = 'vt'\n[[stage]]\nat_step = 5\nshape = { n_layer = 8 }\n",
     r"growth.lr_adapt='vt' is not supported with train.parallel='fsdp'"),
])
def test_bad_config_names_file_and_key(tmp_path, text, match):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("parallel, text, match", [
    ("fsdp", "[growth]\nnew_lr_mult = 2.0\n", r"growth.new_lr_mult is not supported with train.parallel='fsdp' "
     r"\(per-element lr scales need full tensors\); use train.parallel='none' or 'ddp'"),
    ("fsdp", "[[stage]]\ntrigger = 'curvature'\nshape = { n_layer = 12 }\n",
     r"stage\[2\].trigger='curvature' is not supported with train.parallel='fsdp' .*; use train.parallel='none' or "
     r"'ddp', or another trigger"),
])
def test_backend_limits_come_from_the_backends_table(tmp_path, parallel, text, match):
    base = f"[train]\nparallel = '{parallel}'\n[[stage]]\nat_step = 5\nshape = {{ n_layer = 8 }}\n"
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, base + text))


def test_config_validation_asks_the_backends_and_holds_no_rule_of_its_own(tmp_path, monkeypatch):
    """A limit added to (or taken from) ``parallel.support`` is what validation enforces: nothing else decides."""
    from nanogrow.parallel import support

    text = "[train]\nparallel = 'ddp'\n[[stage]]\nat_step = 5\nshape = { n_layer = 8 }\nlag = { steps = 2 }\n"
    load_config(write(tmp_path, text))  # ddp runs LAG
    monkeypatch.setitem(support.LIMITS, "lag", {"ddp": "a limit made up by this test"})
    with pytest.raises(ConfigError, match=r"stage\[1\].lag is not supported with train.parallel='ddp' \(a limit "
                                          r"made up by this test\); use train.parallel='none' or 'fsdp' or "):
        load_config(write(tmp_path, text))
    text = "[train]\nparallel = 'fsdp'\n[growth]\nlr_adapt = 'vt'\n[[stage]]\nat_step = 5\nshape = { n_layer = 8 }\n"
    monkeypatch.setitem(support.LIMITS, "per-element-lr", {})
    load_config(write(tmp_path, text))  # FSDP's limit lifted: the config passes


def test_bad_override_is_named():
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])


def test_set_reaches_stage_keys():
    two_stages = "configs/adaptive-stacking.toml"  # 2 -> 4 at step 100, 4 -> 8 at 200
    cfg = load_config(two_stages, ["stage.1.at_step=50", "stage.2.shape.n_layer=6", "stage.2.op='identity'"])
    assert cfg.stage[0].at_step == 50 and cfg.stage[1].shape == {"n_layer": 6} and cfg.stage[1].op == "identity"
    # one past the last adds a stage; setting at_tokens replaces the stage's at_step
    cfg = load_config(two_stages, ["stage.3.at_step=250", "stage.3.shape.n_layer=10", "stage.2.at_tokens=400000"])
    assert len(cfg.stage) == 3 and cfg.stage[2].shape == {"n_layer": 10}
    assert cfg.stage[1].at_tokens == 400000 and cfg.stage[1].at_step == -1


@pytest.mark.parametrize("item,match", [
    ("stage.0.at_step=5", r"stage 0 is the starting model.*stage.1 .. stage.2"),
    ("stage.4.at_step=5", r"the config has 2 \[\[stage\]\] table\(s\).*stage.3 adds one"),
    ("stage.x.at_step=5", r"expected stage.N.key=value"),
    ("stage.1.shape.n_layr=5", r"stage\[1\].shape has unknown key 'n_layr'"),
    ("stage.1.at_step=500", r"stage at_step values must strictly increase"),
])
def test_bad_stage_override_is_named(item, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/adaptive-stacking.toml", [item])  # two [[stage]] tables


def test_bundled_configs_resolve_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: configs/demo.toml is not a file here
    for name in ("demo", "demo.toml", "configs/demo.toml", "bench/speedup-cpu"):
        assert load_config(name).model.n_layer > 0
    with pytest.raises(ConfigError, match=r"'nope' does not exist.*bundled: .*demo.*nanogrow configs"):
        load_config("nope")


def test_global_batch_must_split_into_micro_batches():
    with pytest.raises(ConfigError, match=r"train.global_batch=12 is not a multiple of the micro-batch 8"):
        load_config("configs/demo.toml", ["train.global_batch=12"])
    with pytest.raises(ConfigError, match=r"global_batch=16 and train.grad_accum=2 are both set"):
        load_config("configs/demo.toml", ["train.global_batch=16", "train.grad_accum=2"])


def test_accelerate_deepspeed_launch_sets_the_zero_stage(tmp_path):
    from nanogrow.config import TrainConfig, from_accelerate

    t = TrainConfig()
    assert from_accelerate(t, {}) is None and t.parallel == "auto"
    note = from_accelerate(t, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    assert t.parallel == "deepspeed" and t.zero_stage == 2 and "from --zero_stage" in note
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}')
    t = TrainConfig()
    from_accelerate(t, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)})
    assert t.parallel == "deepspeed" and t.zero_stage == 3
    t = TrainConfig(parallel="fsdp")
    assert "the config wins" in from_accelerate(t, {"ACCELERATE_USE_DEEPSPEED": "true"}) and t.parallel == "fsdp"
    ds.write_text("not json")
    with pytest.raises(ConfigError, match="ds.json.*zero_optimization.stage"):
        from_accelerate(TrainConfig(), {"ACCELERATE_USE_DEEPSPEED": "true",
                                        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)})


def test_a_frozen_config_refuses_assignment_and_an_editable_copy_does_not():
    import copy
    import dataclasses

    from nanogrow.config import RunConfig, StageConfig

    cfg = RunConfig(stage=[StageConfig(at_step=2, shape={"n_layer": 6})])
    validate(cfg)
    cfg.freeze()
    for obj, name in ((cfg, "stage"), (cfg.train, "lr"), (cfg.model, "d_model"), (cfg.data, "seq_len"),
                      (cfg.growth, "op"), (cfg.stage[0], "at_step")):
        with pytest.raises(dataclasses.FrozenInstanceError, match="frozen once the run has validated it"):
            setattr(obj, name, getattr(obj, name))
    assert copy.deepcopy(cfg).train.frozen  # a copy of a frozen config is frozen
    thawed = cfg.editable_copy()
    thawed.train.lr, thawed.stage[0].at_step = 0.5, 3
    assert cfg.frozen and not thawed.frozen and not thawed.stage[0].frozen
    assert cfg.train.lr != 0.5 and cfg.stage[0].at_step == 2  # the frozen one is untouched
