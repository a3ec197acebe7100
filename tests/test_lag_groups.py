"""LAG across process groups (nanogrow.lag_parallel): 3 candidates on 2 groups (two rounds) of 1 and of 2 gloo
processes pick the same candidate as the one-process LAG, with the same candidate curves, and leave on every rank
the model and optimizer state the one-process LAG continues with. Plus the config rules and the group data view."""

import json
from pathlib import Path

import pytest

from nanogrow.config import ConfigError, load_config
from nanogrow.data import TokenLoader
from nanogrow.lag_parallel import GroupLoader, check_world
from nanogrow.train import Trainer

from dist.tolerance import state_outliers, state_tol  # tests/dist/tolerance.py
from helpers import ROOT, tiny_model_toml, torchrun


def full_state(model, opt) -> dict:
    """name -> tensor, named like tests/dist/worker.py's ``full_state`` (plain models: nothing to gather)."""
    from nanogrow.parallel import unwrap

    m = unwrap(model)
    out = {f"param/{n}": p.detach().clone() for n, p in m.named_parameters()}
    out.update({f"buffer/{n}": b.clone() for n, b in m.named_buffers() if b is not None and not n.startswith("rope")})
    for n, p in m.named_parameters():
        out.update({f"optim/{n}/{k}": v.clone() for k, v in opt.state.get(p, {}).items()})
    return out

CONFIG = tiny_model_toml(n_layer=2) + """
[train]
out_dir = "{out}"
micro_batch = {mb}
max_steps = 8
warmup_steps = 2
lr = 0.01
eval_every = 0
eval_batches = 2
eval_batch_size = 4
log_every = 4
parallel = "{parallel}"

[growth]
optimizer = "{optimizer}"
lr_policy = "rewarm"
rewarm_steps = 2

[[stage]]
at_step = 3
shape = {{ n_layer = 4 }}
lag = {{ steps = 3, {groups}candidates = [
    {{ op = "lag", options = {{ start = 1, block = 1, init = "random" }} }},
    {{ op = "stack" }},
    {{ op = "identity", options = {{ positions = [0, 1] }} }} ] }}
"""


def write_config(tmp_path, data, name, mb, parallel="none", groups=0, optimizer="map+age"):
    p = tmp_path / f"{name}.toml"
    p.write_text(CONFIG.format(data=data, out=tmp_path / name, mb=mb, parallel=parallel, optimizer=optimizer,
                               groups=f"groups = {groups}, " if groups else ""))
    return p


def lag_event(out_dir):
    ckpt = sorted(Path(out_dir).glob("ckpt_*"))[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    return [h for h in meta["history"] if h["event"] == "grow"][0], meta


@pytest.mark.slow
@pytest.mark.parametrize("nproc,parallel,optimizer", [(2, "ddp", "map+age"), (4, "ddp", "reset"),
                                                       (4, "fsdp", "map+age")])
def test_lag_across_groups_matches_one_process_lag(demo_data, tmp_path, nproc, parallel, optimizer):
    """2 groups x 1 process, and 2 groups x 2 processes (DDP or FSDP within each group); "reset" leaves the
    rebuilt candidates without optimizer state, which they must take over from the winner's group."""
    from safetensors.torch import load_file

    one = Trainer(load_config(write_config(tmp_path, demo_data, "one", 4, optimizer=optimizer)), log=lambda *_: None)
    one.run()
    want = full_state(one.model, one.optimizer)

    cfg = write_config(tmp_path, demo_data, "groups", 4 // nproc, parallel, groups=2, optimizer=optimizer)
    proc = torchrun(nproc, "tests/dist/worker.py", "lag_train", cfg, tmp_path / "groups", timeout=300,
                    env={"PYTHONPATH": str(ROOT)}, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, "\n".join(out.splitlines()[-30:])
    assert "OK lag_train" in out and "3 candidates on 2 groups" in out

    a, meta_one = lag_event(tmp_path / "one")
    b, meta_groups = lag_event(tmp_path / "groups")
    assert b["lag"]["groups"] == 2 and meta_groups["world_size"] == nproc
    assert a["lag"]["winner"] == b["lag"]["winner"]
    assert a["lag"]["candidates"] == b["lag"]["candidates"]
    curve_diff = max(abs(x - y) for ca, cb in zip(a["lag"]["curves"], b["lag"]["curves"]) for x, y in zip(ca, cb))
    assert all(len(c) == 3 for c in a["lag"]["curves"] + b["lag"]["curves"])
    assert curve_diff < 1e-5, (a["lag"]["curves"], b["lag"]["curves"])  # same batches; reduction order differs
    assert b["lag"]["flops_per_candidate"] == pytest.approx(a["lag"]["flops_per_candidate"])
    # the same held-out rows scored (each group reads a world micro-step as G slices), charged the same
    assert b["lag"]["score_tokens"] == a["lag"]["score_tokens"]
    assert b["lag"]["score_flops_per_candidate"] == pytest.approx(a["lag"]["score_flops_per_candidate"])
    assert b["lag"]["selection_flops"] == pytest.approx(a["lag"]["selection_flops"])
    assert b["lag"]["selection_seconds"] >= 0
    assert meta_groups["meter"]["total_flops"] == pytest.approx(meta_one["meter"]["total_flops"])
    assert meta_groups["meter"]["total_tokens"] == meta_one["meter"]["total_tokens"]
    assert meta_groups["loader"]["tokens_consumed"] == meta_one["loader"]["tokens_consumed"]
    assert meta_groups["step"] == meta_one["step"] == 8
    got = load_file(str(tmp_path / "groups" / "state.safetensors"))
    assert sorted(got) == sorted(want)
    # 8 steps at lr 0.01: reduction order moves an element by at most 0.25% of an Adam step per step, but for the
    # odd element whose gradient nearly cancels (tests/dist/tolerance.py); a candidate trained on the wrong rows or
    # an unreduced gradient moves most elements by O(lr).
    beyond, allowed, worst = state_outliers(got, want, lr=0.01, steps=8)
    assert beyond <= allowed and worst <= 0.01 * 8, \
        f"state after LAG across groups: {beyond} elements past {state_tol(0.01, 8):.1g}, the largest {worst:.3g}"
    print(f"{nproc} processes, {parallel}, {optimizer}: winner {b['lag']['winner']}, curves within {curve_diff:.1e}, "
          f"state within {worst:.1e} of the one-process LAG ({beyond} element(s) past {state_tol(0.01, 8):.1g})")


def test_group_loader_reads_the_world_batches(demo_data):
    """4 ranks as 2 groups of 2: each group's micro-steps together read exactly the world's step, and the state
    after a step is the world loader's."""
    world = [TokenLoader(demo_data, "train", 16, 2, rank=r, world_size=4) for r in range(4)]
    groups = [GroupLoader(demo_data, 16, 2, dp_rank=d, dp_size=2, n_groups=2, seed=0, vocab_size=512)
              for d in range(2)]
    for _ in range(3):
        want = sorted(tuple(row.tolist()) for w in world for row in w.next_batch()[0])
        got = sorted(tuple(row.tolist()) for g in groups for _ in range(2) for row in g.next_batch()[0])
        assert got == want
    assert groups[1].state_dict() == world[0].state_dict()


def test_groups_config_rules(demo_data, tmp_path, capsys):
    from nanogrow.cli import main

    cfg = load_config(write_config(tmp_path, demo_data, "g3", 4, groups=3))
    with pytest.raises(ConfigError, match=r"stage\[1\]\.lag\.groups=3 must divide the world size 2"):
        check_world(cfg.stage, 2)
    check_world(cfg.stage, 6)
    with pytest.raises(ConfigError, match="must divide the world size 1"):
        Trainer(cfg, log=lambda *_: None)
    with pytest.raises(ConfigError, match="groups must be a positive integer"):
        load_config(write_config(tmp_path, demo_data, "zero", 4, groups=-1))
    # `nanogrow lag --groups G` sets lag.groups on every LAG stage, with the same rules
    assert main(["lag", "--config", str(write_config(tmp_path, demo_data, "cli", 4)), "--groups", "2"]) == 2
    assert "stage[1].lag.groups=2 must divide the world size 1" in capsys.readouterr().err


@pytest.mark.slow
def test_learned_candidate_across_groups_fits_within_its_group(demo_data, tmp_path):
    """A learned candidate averages its map gradients over its own group only: with 2 groups x 2 processes, a
    world-wide all-reduce would mix the two groups' candidates (or hang when only one group fits maps). The run must
    finish with the same state on every rank and record the learned candidate's fit."""
    text = write_config(tmp_path, demo_data, "learned", 2, "ddp", groups=2).read_text()
    start = text.index("candidates = [")
    text = text[:start] + ('candidates = [ { op = "stack" }, '
                           '{ op = "learned", options = { init = "stack", steps = 2, lr = 0.01 } } ] }\n')
    cfg = tmp_path / "learned.toml"
    cfg.write_text(text)
    proc = torchrun(4, "tests/dist/worker.py", "lag_train", cfg, tmp_path / "learned", timeout=300,
                    env={"PYTHONPATH": str(ROOT)}, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, "\n".join(l for l in out.splitlines() if "rror" in l or "File " in l)[-4000:]
    assert "OK lag_train at 4 processes" in out
    event, meta = lag_event(tmp_path / "learned")
    assert event["lag"]["groups"] == 2 and len(event["lag"]["curves"]) == 2
    assert meta["step"] == 8
    # The learned candidate (group 1) wins here, so group 0 (rank 0, which writes the history) only rebuilt its
    # structure: the recorded plan must still be the one group 1 fitted, maps included.
    assert event["lag"]["winner"] == 1
    assert event["plan"]["fit"]["steps"] == 2 and "maps" in event["plan"]


def test_run_that_ends_inside_lag_stops_at_max_steps(demo_data, tmp_path):
    """LAG's candidate steps are training steps: when they reach train.max_steps the run ends there (no extra
    step) and still reports a final validation loss."""
    p = write_config(tmp_path, demo_data, "short", 4)
    p.write_text(p.read_text().replace("max_steps = 8", "max_steps = 6"))
    summary = Trainer(load_config(p), log=lambda *_: None).run()
    assert summary["steps"] == 6 and summary["val_loss"] is not None
    event, meta = lag_event(tmp_path / "short")
    assert meta["step"] == 6 and meta["history"][-1]["event"] == "eval"
