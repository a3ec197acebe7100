"""DeepSpeed ZeRO 1-3 growth (nanogrow.parallel.zero) on CPU with gloo, 2 processes: before growing, the ZeRO run
matches one-process training; the growth gives bit for bit the weights and moments ``grow(policy="map")`` gives
from the same state; the next steps' losses match. Skipped without deepspeed. The first DeepSpeed start compiles a
communication extension (~45 s) into TORCH_EXTENSIONS_DIR (default here: ~/.cache/nanogrow/ext)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist.tolerance import state_tol  # tests/dist/tolerance.py
from helpers import ROOT, ZERO_WORKER, tail, tiny_model_toml, torchrun, zero_env

pytest.importorskip("deepspeed")



@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_growth_matches_single_process(stage):
    p = torchrun(2, ZERO_WORKER, stage, "stack,zero,msg", timeout=400, env=zero_env())
    assert p.stdout.count(f"OK zero{stage}") == 3, tail(p)


def test_zero_refuses_per_element_ages():
    from nanogrow.parallel.zero import ds_config, grow_zero

    with pytest.raises(ValueError, match="stage"):
        ds_config(4, 1)
    with pytest.raises(NotImplementedError, match="ages"):
        grow_zero(None, None, policy="map+age")



# ---- gather_full / scatter_full: many parameters per collective ------------------------------------------------

# Elements per all-reduce: 333 is smaller than every matrix of the tiny model (a 2048-element tensor spans up to 7
# buckets, boundaries fall mid-tensor and mid-partition), 1000 holds many norm gains, 10**6 holds all (one call).
BUCKETS = (333, 1000, 10**6)


@pytest.mark.slow
def test_bucketed_gather_and_scatter_equal_deepspeeds_per_parameter_api():
    """Under ZeRO 1, 2, 3 (this file run by torchrun, ``_buckets_worker``): ``gather_full`` gives the weights and
    both moments bit for bit as DeepSpeed's one-collective-per-parameter getters at every bucket size;
    ``scatter_full`` writes what those getters read back; a growth with buckets smaller than one tensor gives the
    state ``grow()`` gives from the same state, bit for bit (also before the first step: zero moments)."""
    p = torchrun(2, __file__, "buckets", "1,2,3", timeout=400, env=zero_env())
    assert p.stdout.count("OK buckets zero") == 3, tail(p)


# ---- the Trainer under train.parallel = "deepspeed" ----------------------------------------------------------

TRAINER_CONFIG = tiny_model_toml(n_layer=1) + """
[train]
out_dir = "unused"
micro_batch = 2
grad_accum = 2
max_steps = 8
warmup_steps = 2
lr = 0.01
eval_every = 0
eval_batches = 2
eval_batch_size = 4
parallel = "deepspeed"

[growth]
optimizer = "map"
lr_policy = "rewarm"
rewarm_steps = 2

[[stage]]
at_step = 3
shape = {{ n_layer = 2, d_ff = 256 }}
op = "joint"
options = {{ depth_op = "stack", width_op = "msg", depth_options = {{ fade_steps = 3 }}, width_options = {{ fade_steps = 3 }} }}
"""  # noqa: E501  (TOML: an inline table is one line)
# Depth and width at once, with fade-in masks (3 steps): the growth checkpoint at step 3 is mid-fade, so resuming
# from it also restores the masks; by the final checkpoint (step 8) they are gone and export-hf can read it.

# The ZeRO runs are 2 processes x micro-batch 2; the reference is 1 process x micro-batch 4: the same global batch.
# Gradient clipping (train.grad_clip = 1.0) and accumulation (2 micro-steps) are on, in DeepSpeed and in torch.
LOSS_TOL = 1e-4
WEIGHT_TOL = state_tol(lr=0.01, steps=8)  # tests/dist/tolerance.py: 0.25% of an Adam step per step (2e-4)
# Why these tolerances: the two runs differ only in the order of floating-point reductions (gradients averaged over
# 2 ranks by DeepSpeed's reduce(-scatter) vs summed in one process; the clipping norm over partitions), ~1e-7
# relative per step. Adam divides by sqrt(v): where v is tiny, that rounding noise becomes an lr-sized (1e-2)
# relative change of a few elements, so weights drift apart by ~1e-5 within 3 steps (measured: 1.5e-5) and losses
# by about the same. A real error (a missed reduction, a wrong moment, clipping or accumulation) moves losses by
# 1e-2 or more.


def _one_process_losses(cfg):
    from nanogrow.train import Trainer

    trainer = Trainer(cfg, log=lambda *a, **k: None)
    losses = []
    while trainer.step < trainer.t.max_steps:
        losses.append(trainer.advance())
    trainer.save()
    return losses


@pytest.fixture(scope="module")
def zero_trainer_runs(demo_data, tmp_path_factory):
    """One torchrun launch: the Trainer under ZeRO 1, 2 and 3 (run with a growth event, then a resume from the
    growth checkpoint), and the one-process reference run."""
    import json

    from nanogrow.config import load_config

    tmp = tmp_path_factory.mktemp("zero_trainer")
    config = tmp / "ds.toml"
    config.write_text(TRAINER_CONFIG.format(data=demo_data))
    p = torchrun(2, ZERO_WORKER, "trainer", config, tmp / "out", "1,2,3", timeout=600, env=zero_env())
    runs = {r["stage"]: r for r in map(json.loads, (l for l in p.stdout.splitlines() if l.startswith("{")))}
    assert sorted(runs) == [1, 2, 3], tail(p)
    ref_cfg = load_config(config, ["train.parallel='none'", "train.micro_batch=4", f"train.out_dir='{tmp / 'ref'}'"])
    return {"tmp": tmp, "config": config, "runs": runs, "ref": _one_process_losses(ref_cfg)}


def _weights(path):
    from nanogrow.hf import load_model

    return load_model(path)[0].state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trainer_under_zero_with_growth_matches_one_process(zero_trainer_runs, stage):
    r, ref = zero_trainer_runs["runs"][stage], zero_trainer_runs["ref"]
    assert r["grow_step"] == 3 and len(r["losses"]) == len(ref) == 8
    diff = max(abs(a - b) for a, b in zip(r["losses"], ref))
    assert diff <= LOSS_TOL, (r["losses"], ref)
    # The growth checkpoint (step 3, ZeRO partitions consolidated by zero_to_fp32) holds the one-process weights.
    tmp = zero_trainer_runs["tmp"]
    ours = _weights(tmp / "out" / f"zero{stage}" / "run" / "ckpt_0000003")
    theirs = _weights(tmp / "ref" / "ckpt_0000003")
    assert sorted(ours) == sorted(theirs)  # including the fade-in masks
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= WEIGHT_TOL, worst


@pytest.mark.slow
def test_zero_resume_at_the_same_world_size_continues_exactly(zero_trainer_runs):
    for stage, r in zero_trainer_runs["runs"].items():
        g = r["grow_step"]
        # DeepSpeed's checkpoint holds the fp32 partitions, moments and step counts; data position, lr schedule and
        # masks come from meta.json: the resumed steps are the uninterrupted ones, bit for bit.
        assert r["resumed"] == r["losses"][g:], (stage, r)


@pytest.mark.slow
def test_zero_run_restarts_from_a_consolidated_checkpoint(zero_trainer_runs):
    for stage, r in zero_trainer_runs["runs"].items():
        # Consolidated weights (zero_to_fp32) -> DCP -> a new ZeRO run at 2 processes: the same model and data
        # position, so the same loss at the restart step (only the fresh optimizer differs, after it).
        assert abs(r["restart_first"] - r["losses"][r["grow_step"]]) <= LOSS_TOL, (stage, r)


@pytest.mark.slow
def test_zero_checkpoint_at_another_world_size_is_refused_and_restarts_from_consolidated_weights(zero_trainer_runs):
    from nanogrow.checkpoint import CheckpointError, read_meta
    from nanogrow.cli import main as cli_main
    from nanogrow.config import load_config
    from nanogrow.hf import export_hf
    from nanogrow.train import Trainer

    tmp, r = zero_trainer_runs["tmp"], zero_trainer_runs["runs"][2]
    ckpt = tmp / "out" / "zero2" / "run" / "ckpt_0000003"
    cfg = load_config(zero_trainer_runs["config"], ["train.micro_batch=4", f"train.out_dir='{tmp / 'restart'}'"])
    # One process (train.parallel = "deepspeed" falls back to none): refused before anything is built.
    with pytest.raises(CheckpointError, match="world size 2.*cannot repartition.*nanogrow consolidate"):
        Trainer(cfg, resume=str(ckpt))
    assert cli_main(["consolidate", str(ckpt), "--out", str(tmp / "consolidated")]) == 0
    restart = tmp / "consolidated" / ckpt.name
    meta = read_meta(restart)
    assert meta["step"] == 3 and meta["history"][-1]["event"] == "consolidate" and "format" not in meta
    trainer = Trainer(cfg, resume=str(restart), log=lambda *a, **k: None)
    assert trainer.step == 3 and trainer.stage_index == 1 and trainer.ramp is not None
    # Same weights, masks and data position: the first step's loss (computed before the fresh optimizer acts)
    # is the ZeRO run's loss at that step.
    assert abs(trainer.train_step() - r["losses"][3]) <= LOSS_TOL
    # export-hf reads a DeepSpeed checkpoint through the same consolidation (the final one: fade-in over).
    out = export_hf(tmp / "out" / "zero2" / "run" / "ckpt_0000008", tmp / "hf", log=lambda *a: None)
    assert (Path(out) / "config.json").is_file()


# ---- what the DeepSpeed backend refuses, at config time ---------------------------------------------------------

def _zero_config(**changes):
    from nanogrow.config import RunConfig

    raw = RunConfig().to_dict()
    raw["train"].update(parallel="deepspeed")
    raw["growth"].update(optimizer="map")
    raw["stage"] = [{"at_step": 10, "shape": {"n_layer": 8}, "op": "stack"}]
    for key, value in changes.items():
        section, name = key.split("__")
        if section == "stage":
            raw["stage"][0][name] = value
        else:
            raw[section][name] = value
    return RunConfig.from_dict(raw)


@pytest.mark.parametrize("changes, message", [
    ({"train__zero_stage": 4}, "train.zero_stage=4 is not one of 1, 2, 3"),
    ({"growth__optimizer": "map+age"}, "growth.optimizer='map\\+age' is not supported with train.parallel='deepspeed'"),
    ({"stage__optimizer": "map+age"}, "stage\\[1\\].optimizer='map\\+age'"),
    ({"growth__lr_adapt": "vt"}, "growth.lr_adapt='vt' is not supported"),
    ({"stage__lag": {"steps": 2}}, "stage\\[1\\].lag is not supported"),
    ({"stage__trigger": "gradient", "stage__at_step": -1}, "trigger='gradient' is not supported"),
    ({"train__replicate": 2}, "train.replicate=2"),
    ({"stage__op": "learned"}, "stage\\[1\\].op='learned' is not supported"),
])
def test_deepspeed_config_refuses_what_zero_cannot_hold(changes, message):
    from nanogrow.config import ConfigError, validate

    validate(_zero_config())  # the base config is fine
    with pytest.raises(ConfigError, match=message):
        validate(_zero_config(**changes))


# ---- launch/deepspeed.sh ---------------------------------------------------------------------------------------

def _launch(*args, **env):
    e = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    e.setdefault("TORCH_EXTENSIONS_DIR", zero_env()["TORCH_EXTENSIONS_DIR"])
    return subprocess.run(["bash", str(ROOT / "launch" / "deepspeed.sh"), *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=300)


def test_deepspeed_launcher_multinode_command():
    p = _launch("--nproc", "8", "--stage", "3", "--hostfile", "hosts.txt", "configs/demo.toml", "--resume", "auto",
                DRY_RUN="1")
    assert p.returncode == 0, p.stderr
    cmd = p.stderr.strip().splitlines()[-1]
    assert ("-m deepspeed.launcher.runner --hostfile hosts.txt --num_gpus 8 --no_local_rank --module nanogrow.cli "
            "train --config configs/demo.toml --set train.parallel=deepspeed --set train.zero_stage=3 --resume auto"
            in cmd), cmd
    assert _launch("--stage", "4", "configs/demo.toml", DRY_RUN="1").returncode == 2


@pytest.mark.slow
def test_deepspeed_launcher_trains_and_checkpoints(tmp_path, demo_data):
    """`nanogrow train` through the launcher: two gloo processes, ZeRO 2, two steps, a DeepSpeed checkpoint."""
    import json

    # model.n_layer: the demo's start depth (its growth's layer order names layers 0-3)
    sets = {"train.max_steps": 2, "train.warmup_steps": 1, "train.out_dir": tmp_path, "model.n_layer": 4,
            "model.d_model": 32, "model.n_head": 2, "model.n_kv_head": 2, "model.vocab_size": 512,
            "data.dir": demo_data, "train.eval_every": 0, "train.eval_batches": 1, "growth.optimizer": "map"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    p = _launch("--nproc", "2", "--stage", "2", "configs/demo.toml", *args)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "2 process(es)" in p.stdout and "done: 2 steps" in p.stdout
    meta = json.loads((tmp_path / "ckpt_0000002" / "meta.json").read_text())
    assert meta["format"] == "deepspeed" and meta["zero_stage"] == 2 and meta["world_size"] == 2


def test_zero_checkpoint_resumes_only_at_its_world_size_stage_and_backend(tmp_path):
    from nanogrow.checkpoint import CheckpointError, check_resume

    meta = {"format": "deepspeed", "world_size": 2, "zero_stage": 2}
    check_resume(meta, tmp_path, "deepspeed", 2, 2)  # the same: fine
    check_resume({"world_size": 2}, tmp_path, "fsdp", 3, 1)  # DCP checkpoints reshard: not this check's business
    for parallel, world, stage, says in [("deepspeed", 4, 2, "this run is ZeRO-2 at world size 4"),
                                         ("deepspeed", 2, 3, "this run is ZeRO-3 at world size 2"),
                                         ("fsdp", 2, 2, "this run is train.parallel='fsdp' at world size 2")]:
        with pytest.raises(CheckpointError, match=f"ZeRO-2 at world size 2; {says}.*nanogrow consolidate"):
            check_resume(meta, tmp_path, parallel, world, stage)


def _buckets_worker(stages: list[int]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import deepspeed

    sys.path.insert(0, str(Path(__file__).parent / "dist"))
    from worker import GLOBAL_BATCH, PLANS  # tests/dist/worker.py
    from zero_worker import check, ds_full, ds_step, groups_of, ref_full  # tests/dist/zero_worker.py

    from nanogrow.dist_utils import shutdown_and_exit
    from nanogrow.grow import grow
    from nanogrow.grow.optim import AdamW
    from nanogrow.grow.testing import tiny_config
    from nanogrow.model import build_model
    from nanogrow.parallel import zero

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = tiny_config()
    default_bucket = zero.BUCKET_NUMEL

    def new_run(stage):
        model = build_model(cfg, seed=0)
        config = zero.ds_config(stage, GLOBAL_BATCH // dist.get_world_size())
        return zero.zero_initialize(model, groups_of(model), config)

    def key(name, kind):
        return f"param/{name}" if kind is None else f"optim/{name}/{kind}"

    for stage in stages:
        run = new_run(stage)
        assert not zero.has_state(run)
        for s in range(2):
            ds_step(run, s, cfg)
        assert zero.has_state(run)
        names, params = zip(*run.module.named_parameters())
        ref = ds_full(run)  # DeepSpeed's safe_get_full_*: one all-reduce / all-gather per tensor
        for bucket in BUCKETS:
            for kind in (None, "exp_avg", "exp_avg_sq"):
                got = zero.gather_full(run.engine, list(params), kind, bucket_numel=bucket)
                for n, t in zip(names, got):
                    assert torch.equal(t, ref[key(n, kind)]), (stage, bucket, key(n, kind))
        g = torch.Generator().manual_seed(7)  # the same values on every rank
        values = {k: torch.randn(v.shape, generator=g) for k, v in ref.items()}
        for kind in (None, "exp_avg", "exp_avg_sq"):
            zero.scatter_full(run.engine, list(params), [values[key(n, kind)] for n in names], kind)
        check(ds_full(run), values, f"zero{stage} scatter_full", 0.0)
        zero.destroy(run)

        # Growth with buckets smaller than one tensor: the state grow() gives from the same state, bit for bit.
        zero.BUCKET_NUMEL = BUCKETS[0]
        for op, steps in (("zero", 3), ("stack", 0)):  # "stack" before the first step: no moments yet
            run = new_run(stage)
            for s in range(steps):
                ds_step(run, s, cfg)
            plan = PLANS[op](cfg)
            if steps:
                before = ds_full(run)
            else:
                zero._relink(run)
                before = {f"param/{n}": deepspeed.utils.safe_get_full_fp32_param(p).clone()
                          for n, p in run.module.named_parameters()}
            ref_m = build_model(cfg, seed=0)
            ref_o = AdamW(groups_of(ref_m))
            with torch.no_grad():
                for n, p in ref_m.named_parameters():
                    p.copy_(before[f"param/{n}"])
                    if steps:
                        ref_o.state[p] = {"step": torch.tensor(float(steps)), **{
                            k: before[f"optim/{n}/{k}"].clone() for k in ("exp_avg", "exp_avg_sq")}}
            ref_m, ref_o = grow(ref_m, ref_o, plan, policy="map")
            run = zero.grow_zero(run, plan, policy="map")
            want = ref_full(ref_m, ref_o) if steps else {
                **{f"param/{n}": p.detach() for n, p in ref_m.named_parameters()},
                **{key(n, k): torch.zeros(p.shape) for n, p in ref_m.named_parameters()
                   for k in ("exp_avg", "exp_avg_sq")}}
            check(ds_full(run), want, f"zero{stage} {op} growth (bucket {BUCKETS[0]}, {steps} steps)", 0.0)
            assert zero.zero_step_count(run) == steps
            ds_step(run, steps, plan.new_cfg)  # the grown engine trains
            zero.destroy(run)
        zero.BUCKET_NUMEL = default_bucket
        if dist.get_rank() == 0:
            print(f"OK buckets zero{stage}", flush=True)
    shutdown_and_exit()


if __name__ == "__main__":  # torchrun --nproc_per_node=2 tests/test_parallel_zero.py buckets 1,2,3
    _buckets_worker([int(s) for s in sys.argv[2].split(",")])
