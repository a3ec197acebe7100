"""Sequence-length stages: short sequences early, long later. Exact resume across the change, the exact token
stream (nothing skipped, nothing repeated), RoPE tables rebuilt on every rank, FLOPs accounting at each stage's
own length, schedule boundaries, and bad configs refused before any compute."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanogrow.config import ConfigError, eval_seq_len
from nanogrow.data import ShardSet, shard_order
from nanogrow.model import ModelConfig, build_model, rope_tables
from nanogrow.schedule import stage_layouts, stage_start_steps
from nanogrow.train import Trainer

from helpers import run_steps, tiny_run_config, with_stages

QUIET = lambda *_: None  # noqa: E731
ROOT = Path(__file__).resolve().parents[1]

# Stage 0: 2 layers, context 32, sequences of 16 x 8. Stage 1 (step 3): only the batch shape changes, to 32 x 4
# (no parameter change). Stage 2 (step 6): 4 layers (stack) together with a longer context, 64 x 2.
STAGES = [
    {"at_step": 3, "seq_len": 32, "micro_batch": 4},
    {"at_step": 6, "shape": {"n_layer": 4, "max_seq_len": 64}, "op": "stack", "seq_len": 64, "micro_batch": 2},
]


def seqlen_config(data_dir, out_dir, stages=STAGES, **growth):
    cfg = tiny_run_config(data_dir, out_dir)
    cfg.model.max_seq_len, cfg.data.seq_len, cfg.train.micro_batch = 32, 16, 8
    cfg.data.eval_seq_len = 32  # the starting model's context; validation stays at it for the whole run
    return with_stages(cfg, stages, **{"lr_policy": "rewarm", "rewarm_steps": 2, **growth})


def record_batches(trainer) -> list:
    """Wrap the trainer's loader so that every (x, y) it hands out is kept, in order."""
    seen, inner = [], trainer.loader.next_batch

    def next_batch():
        x, y = inner()
        seen.append((x.clone(), y.clone()))
        return x, y
    trainer.loader.next_batch = next_batch
    return seen


def global_stream(data_dir, n_tokens: int):
    shards = ShardSet(data_dir, "train")
    return torch.from_numpy(shards.read(shard_order(len(shards.paths), 0, 0), 0, n_tokens + 1))


def assert_same_state(a: Trainer, b: Trainer) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for name in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][name]), torch.as_tensor(ob[i][name])), (i, name)
    assert torch.equal(a.model.rope_cos, b.model.rope_cos) and torch.equal(a.model.rope_sin, b.model.rope_sin)
    assert a.loader.state_dict() == b.loader.state_dict()


@pytest.mark.parametrize("stop_at", [4, 8])  # after the batch-shape change; after the context change + growth
def test_resume_after_seq_len_change_matches_uninterrupted_run_and_stream(demo_data, tmp_path, stop_at):
    full = Trainer(seqlen_config(demo_data, tmp_path / "full"), log=QUIET)
    full_batches = record_batches(full)
    full_losses = run_steps(full, 12)
    assert [(s["seq_len"], s["micro_batch"], s["steps"]) for s in full.stage_stats.rows] == [(16, 8, 3), (32, 4, 3),
                                                                                          (64, 2, 6)]

    first = Trainer(seqlen_config(demo_data, tmp_path / "split"), log=QUIET)
    split_batches = record_batches(first)
    run_steps(first, stop_at)
    first.save()
    del first
    second = Trainer(seqlen_config(demo_data, tmp_path / "split"), resume="auto", log=QUIET)
    assert second.step == stop_at and second.seq_len == (32 if stop_at < 6 else 64)
    assert second.model.rope_cos.shape[0] == second.model_config.max_seq_len == (32 if stop_at < 6 else 64)
    resumed_batches = record_batches(second)
    losses = run_steps(second, 12 - stop_at)
    split_batches = split_batches + resumed_batches
    assert losses == full_losses[stop_at:]
    assert_same_state(full, second)

    # The exact stream: batch after batch, the inputs tile the global token stream without gap or overlap,
    # and every target is the token after its input, across both shape changes and the resume.
    for batches in (full_batches, split_batches):
        assert [tuple(x.shape) for x, _ in batches] == [(8, 16)] * 3 + [(4, 32)] * 3 + [(2, 64)] * 6
        xs = torch.cat([x.reshape(-1) for x, _ in batches])
        ys = torch.cat([y.reshape(-1) for _, y in batches])
        stream = global_stream(demo_data, xs.numel())
        assert xs.numel() == 12 * 128 == full.loader.tokens_consumed
        assert torch.equal(xs, stream[:-1]) and torch.equal(ys, stream[1:])


def test_seq_len_only_stage_does_not_touch_the_weights(demo_data, tmp_path):
    trainer = Trainer(seqlen_config(demo_data, tmp_path), log=QUIET)
    run_steps(trainer, 3)
    model, opt = trainer.model, trainer.optimizer
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    lr_before = trainer.current_lr(3)
    assert trainer.growth.due()
    event = trainer.growth.grow_next_stage()
    assert trainer.model is model and trainer.optimizer is opt  # no copy of the weights, no new optimizer
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert event["plan"] is None and event["stage"] == 1 and event["params_before"] == event["params_after"]
    assert (event["seq_len_before"], event["seq_len_after"]) == (16, 32)
    assert (event["micro_batch_before"], event["micro_batch_after"]) == (8, 4)
    assert event["val_loss_after"] == event["val_loss_before"]
    assert trainer.current_lr(3) == lr_before  # growth.lr_policy='rewarm' is about new weights: not applied
    assert trainer.tokens_per_step() == 128 and trainer.loader.state_dict()["seq_len"] == 32
    # the next stage grows the weights and the context: its RoPE tables are rebuilt at 64 positions
    run_steps(trainer, 4)
    assert trainer.stage_index == 2 and trainer.model is not model
    cos, sin = rope_tables(trainer.model_config.head_dim, 64, trainer.model_config.rope_theta)
    assert torch.equal(trainer.model.rope_cos, cos) and torch.equal(trainer.model.rope_sin, sin)
    assert trainer.model.config.max_seq_len == 64 and trainer.history[-1]["plan"]["op"] == "stack"


def test_set_max_seq_len_equals_a_model_built_at_that_length():
    c = ModelConfig(n_layer=1, d_model=32, n_head=2, n_kv_head=2, vocab_size=64, max_seq_len=16)
    model = build_model(c, seed=0)
    model.set_max_seq_len(40)
    ref = build_model(ModelConfig(**{**c.__dict__, "max_seq_len": 40}), seed=0)
    assert torch.equal(model.rope_cos, ref.rope_cos) and torch.equal(model.rope_sin, ref.rope_sin)
    x = torch.randint(0, 64, (2, 40))
    assert torch.equal(model(x), ref(x))
    assert model.state_dict().keys() == ref.state_dict().keys()  # the tables are not checkpointed


def test_flops_and_tokens_per_stage_match_hand_computation(demo_data, tmp_path):
    trainer = Trainer(seqlen_config(demo_data, tmp_path), log=QUIET)
    run_steps(trainer, 12)
    d, v, ff = 64, 512, 192  # SwiGLU d_ff: 8/3 * 64 rounded up to a multiple of 32
    per_layer = 2 * d + 4 * d * d + 3 * d * ff  # two norms, q k v o (4 heads of 16; kv: 2 heads -> 2 * 32 * 64)
    per_layer -= 2 * d * (d - 32)  # grouped-query: wk and wv are [32, 64], not [64, 64]
    expected = []
    for layers, seq, mb, steps in ((2, 16, 8, 3), (2, 32, 4, 3), (4, 64, 2, 6)):
        n = layers * per_layer + d + v * d  # blocks, final norm, LM head (untied; the embedding is a lookup)
        fpt = 6 * n + 12 * layers * d * seq  # attention term at this stage's own sequence length
        tokens = steps * mb * seq
        expected.append((tokens, tokens * fpt))
    got = [(s["tokens"], s["flops"]) for s in trainer.stage_stats.rows]
    assert [t for t, _ in got] == [t for t, _ in expected] == [384, 384, 768]
    for (_, f), (_, g) in zip(got, expected):
        assert f == pytest.approx(g, rel=1e-12)
    assert trainer.meter.total_flops == pytest.approx(sum(f for _, f in expected), rel=1e-12)
    assert trainer.meter.total_tokens == sum(t for t, _ in expected)
    table = trainer.stage_stats.table()
    assert "seq x mb" in table and "64 x 2" in table and "16 x 8" in table


def test_budgeted_boundaries_use_each_stages_own_batch_and_length(demo_data, tmp_path):
    stages = [{"seq_len": 32, "micro_batch": 4}, {"shape": {"n_layer": 4}, "op": "stack", "seq_len": 32}]
    cfg = tiny_run_config(demo_data, tmp_path)
    cfg.model.max_seq_len, cfg.data.seq_len, cfg.train.micro_batch = 32, 16, 8
    cfg.train.max_steps = 120
    cfg = with_stages(cfg, stages, schedule="equal-flops")
    trainer = Trainer(cfg, log=QUIET)
    lay = stage_layouts(cfg.model, 16, 8, cfg.stage)
    tps = [8 * 16, 4 * 32, 4 * 32]
    fpt = [ModelConfig(**{**cfg.model.__dict__, "n_layer": n}).flops_per_token(t) for n, t in ((2, 16), (2, 32),
                                                                                              (4, 32))]
    assert [x.tokens_per_step() for x in lay] == tps and [x.flops_per_token() for x in lay] == fpt
    w = [1 / (a * b) for a, b in zip(tps, fpt)]
    by_hand = [round(120 * sum(w[:k + 1]) / sum(w)) for k in range(2)]
    assert [s["at_step"] for s in trainer.growth.starts] == by_hand == stage_start_steps("equal-flops", 120, tps, fpt)
    assert fpt[1] > fpt[0]  # the attention term: the same shape costs more per token at 32 than at 16


@pytest.mark.parametrize("stages,data,match", [
    ([{"at_step": 3, "seq_len": 128}], {}, r"stage\[1\]\.seq_len=128 exceeds the model's max_seq_len=64 after "
                                           r"stage\[1\]; raise it in the same stage with stage\[1\]\.shape"),
    ([{"at_step": 3, "shape": {"max_seq_len": 32}, "seq_len": 32}], {"eval_seq_len": 32},
     r"stage\[1\]\.shape\.max_seq_len=32 is below the model's max_seq_len=64"),
    ([{"at_step": 3, "shape": {"max_seq_len": 128}, "seq_len": 128}], {},
     r"validation seq_len \(data\.eval_seq_len=0: the run's longest training seq_len, 128\) exceeds "
     r"model\.max_seq_len=64"),
    ([{"at_step": 3, "shape": {"max_seq_len": 128}, "seq_len": 128}], {"eval_seq_len": 100},
     r"data\.eval_seq_len=100 exceeds model\.max_seq_len=64"),
    ([{"at_step": 3, "seq_len": 64}], {}, r"stage\[1\] changes nothing"),
    ([{"at_step": 3, "seq_len": 32, "op": "stack"}], {}, r"stage\[1\] changes no parameter shape, so stage\[1\]\.op"),
    ([{"at_step": 3, "seq_len": 32, "lag": {"steps": 2}}], {}, r"stage\[1\]\.lag has nothing to grow"),
    ([{"at_step": 3, "seq_len": -8}], {}, r"stage\[1\]\.seq_len must be >= 0"),
])
def test_bad_seq_len_stages_are_refused(demo_data, tmp_path, stages, data, match):
    cfg = tiny_run_config(demo_data, tmp_path)  # max_seq_len 64, seq_len 64
    for k, v in data.items():
        setattr(cfg.data, k, v)
    with pytest.raises(ConfigError, match=match):
        with_stages(cfg, stages)


def test_eval_seq_len_is_fixed_at_the_longest_training_length(demo_data, tmp_path):
    cfg = tiny_run_config(demo_data, tmp_path)
    cfg.data.seq_len = 16
    cfg = with_stages(cfg, [{"at_step": 3, "seq_len": 64, "micro_batch": 1}])
    assert eval_seq_len(cfg) == 64
    trainer = Trainer(cfg, log=QUIET)
    assert {tuple(x.shape) for x, _ in trainer.val} == {(4, 64)}
    before = trainer.evaluate()
    run_steps(trainer, 4)
    assert trainer.seq_len == 64 and {tuple(x.shape) for x, _ in trainer.val} == {(4, 64)}
    assert trainer.evaluate() != before


def test_a_short_stage_is_also_evaluated_at_its_own_length(demo_data, tmp_path):
    """Evaluations during a 16-token stage record the loss on 16-token validation windows next to the fixed-length
    one (history, stage stats); once the stage trains at the validation length there is only the one."""
    from nanogrow.data import val_batches
    from nanogrow.parallel import unwrap

    cfg = tiny_run_config(demo_data, tmp_path, eval_every=2, max_steps=6)
    cfg.data.seq_len = 16
    cfg = with_stages(cfg, [{"at_step": 3, "seq_len": 64, "micro_batch": 1}])
    trainer = Trainer(cfg, log=QUIET)
    assert trainer.evaluate_at_stage_len() is not None
    expected = []
    model = unwrap(trainer.model)
    with torch.no_grad():
        model.eval()
        for x, y in val_batches(demo_data, 16, 4, 2, vocab_size=512):
            expected.append(float(model(x, y)))
        model.train()
    assert trainer.evaluate_at_stage_len() == pytest.approx(sum(expected) / 2, rel=1e-6)
    trainer.run()
    evals = [h for h in trainer.history if h["event"] == "eval"]
    assert [h["step"] for h in evals] == [2, 4, 6]
    assert "val_loss_stage_len" in evals[0] and evals[0]["val_loss_stage_len"] != evals[0]["val_loss"]
    assert all("val_loss_stage_len" not in h for h in evals[1:])  # seq_len 64 from step 3: the validation length
    assert trainer.stage_stats.rows[0]["val_loss_stage_len"] == evals[0]["val_loss_stage_len"]
    assert "val_loss_stage_len" not in trainer.stage_stats.rows[1] and trainer.evaluate_at_stage_len() is None


# ---- FSDP: the RoPE tables are rebuilt on every rank -----------------------------------------------------------

CONFIG = """
[model]
n_layer = 1
d_model = 64
n_head = 4
n_kv_head = 2
vocab_size = 512
max_seq_len = 32

[data]
dir = "{data}"
seq_len = 16
eval_seq_len = 32

[train]
out_dir = "{out}"
micro_batch = {mb}
max_steps = 8
warmup_steps = 2
lr = 0.01
eval_every = 2
eval_batches = 2
eval_batch_size = 4
log_every = 4
parallel = "{parallel}"

[[stage]]
at_step = 3
seq_len = 32

[[stage]]
at_step = 5
shape = {{ n_layer = 2, max_seq_len = 64 }}
op = "stack"
seq_len = 64
micro_batch = {mb2}
"""


def test_fsdp_two_processes_match_one_process_across_seq_len_stages(demo_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    runs = {}
    for name, mb, mb2, parallel, launcher in (
            ("one", 8, 2, "none", [sys.executable]),
            ("two", 4, 1, "fsdp", [str(Path(sys.executable).with_name("torchrun")), "--standalone",
                                   "--nproc_per_node=2"])):
        p = tmp_path / f"{name}.toml"
        p.write_text(CONFIG.format(data=demo_data, out=tmp_path / name, mb=mb, mb2=mb2, parallel=parallel))
        proc = subprocess.run([*launcher, "-m", "nanogrow.cli", "train", "--config", str(p)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        assert "seq_len 32 -> 64" in proc.stdout
        meta = json.loads((sorted((tmp_path / name).glob("ckpt_*"))[-1] / "meta.json").read_text())
        runs[name] = meta
    a = [h["val_loss"] for h in runs["one"]["history"] if h["event"] == "eval"]
    b = [h["val_loss"] for h in runs["two"]["history"] if h["event"] == "eval"]
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert runs["two"]["seq_len"] == 64 and runs["two"]["model_config"]["max_seq_len"] == 64
    consumed = 3 * 128 + 2 * 256 + 3 * 128
    assert runs["one"]["loader"]["tokens_consumed"] == runs["two"]["loader"]["tokens_consumed"] == consumed


def test_lag_candidates_train_at_the_new_stages_seq_len(demo_data, tmp_path):
    stages = [{"at_step": 3, "shape": {"n_layer": 4, "max_seq_len": 64}, "seq_len": 64, "micro_batch": 2,
               "lag": {"candidates": [{"op": "stack"}, {"op": "interleave"}], "steps": 2}}]
    cfg = seqlen_config(demo_data, tmp_path, stages=stages)
    trainer = Trainer(cfg, log=QUIET)
    batches = record_batches(trainer)
    run_steps(trainer, 6)
    event = [h for h in trainer.history if h["event"] == "grow"][0]
    # every candidate trained its k = 2 steps on 64-token sequences with the context raised to 64
    fpt = trainer.model_config.flops_per_token(64)
    assert event["lag"]["flops_per_candidate"] == [pytest.approx(2 * 128 * fpt, rel=1e-12)] * 2
    assert trainer.seq_len == 64 and trainer.model.rope_cos.shape[0] == 64
    # the 4 held-out batches the candidates are scored on come first, at the new stage's shape; then both
    # candidates read the same two batches (LAG forks the loader); the winner's state continues the stream
    assert [tuple(x.shape) for x, _ in batches] == [(8, 16)] * 3 + [(2, 64)] * 4 + [(2, 64)] * 2 * 2 + [(2, 64)] * 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[7:9], batches[9:11]))
    run = batches[:9] + batches[11:]
    xs = torch.cat([x.reshape(-1) for x, _ in run])
    assert trainer.step == 8 and trainer.loader.tokens_consumed == xs.numel() == 12 * 128
    assert torch.equal(xs, global_stream(demo_data, xs.numel())[:-1])


def test_bench_flops_budget_costs_each_stage_at_its_own_length(demo_data, tmp_path):
    from nanogrow.bench import equal_flops_steps, scratch_config

    cfg = seqlen_config(demo_data, tmp_path)
    cfg.train.max_steps = 40
    ref = scratch_config(cfg)
    assert (ref.model.n_layer, ref.data.seq_len, ref.train.micro_batch, ref.data.eval_seq_len) == (4, 64, 2, 32)
    f = [ModelConfig(**{**cfg.model.__dict__, "n_layer": n, "max_seq_len": 64}).flops_per_token(t)
         for n, t in ((2, 16), (2, 32), (4, 64))]
    spent = 3 * 128 * f[0] + 3 * 128 * f[1]
    assert equal_flops_steps(cfg) == 6 + round((40 * 128 * f[2] - spent) / (128 * f[2]))


def test_bench_compound_against_depth_only_spends_one_budget(demo_data, tmp_path):
    from nanogrow.bench import speedup_compound

    def make(stages, d_model, n_head, seq_len, mb):
        cfg = tiny_run_config(demo_data, tmp_path, max_steps=8, eval_every=2)
        cfg.model.d_model, cfg.model.n_head, cfg.model.n_kv_head, cfg.model.n_layer = d_model, n_head, 1, 1
        cfg.data.seq_len, cfg.train.micro_batch = seq_len, mb
        return with_stages(cfg, stages)

    compound = make([{"at_step": 2, "shape": {"d_model": 64, "n_head": 4, "d_ff": 192}, "op": "zero",
                      "seq_len": 32, "micro_batch": 4},
                     {"at_step": 4, "shape": {"n_layer": 2}, "op": "stack", "seq_len": 64, "micro_batch": 2}],
                    32, 2, 16, 8)
    depth = make([{"at_step": 4, "shape": {"n_layer": 2}, "op": "stack"}], 64, 4, 64, 2)
    res = speedup_compound(compound, depth, seeds=[0], out_dir=str(tmp_path / "bench"), log=QUIET)
    runs = res["runs"][0]
    assert set(runs) == {"scratch", "depth-only", "compound"}
    step_flops = 128 * ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=1, vocab_size=512,
                                   max_seq_len=64).flops_per_token(64)
    for name in ("depth-only", "compound"):  # the same FLOPs as scratch, up to half a last-stage step
        assert abs(runs[name]["flops"] - runs["scratch"]["flops"]) <= step_flops / 2 + 1
        assert runs[name]["flops_ratio_vs_depth-only"] is None or runs[name]["flops_ratio_vs_depth-only"] > 0
    assert runs["depth-only"]["flops_ratio_vs_depth-only"] == 1.0
    for r in runs.values():  # the Handbook runner's curve layout, every column one the Trainer writes
        assert r["curve"] and all(len(p) == 4 and None not in p for p in r["curve"])
    with pytest.raises(ValueError, match="same shape, seq_len"):
        speedup_compound(compound, make([{"at_step": 4, "shape": {"n_layer": 3}, "op": "stack"}], 64, 4, 64, 2),
                         seeds=[0], out_dir=str(tmp_path / "bad"), log=QUIET)
