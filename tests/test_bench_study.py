"""``nanogrow bench study``: a fixed study trained from empty stores, each way, runs/hour printed."""

from __future__ import annotations

import pytest

from nanogrow.handbook.bench import bench_study, study_copy
from nanogrow.handbook.study import load_study
from tests.test_handbook import small_study


def test_bench_study_trains_every_run_from_an_empty_store_and_prints_runs_per_hour(tmp_path, demo_data):
    study = small_study(tmp_path, demo_data)
    lines = []
    out = bench_study([str(study.path)], modes=["serial"], rounds=2, jobs=1, log=lines.append,
                      out_json=str(tmp_path / "bench.json"))
    assert not study.store_path.exists()  # the study's own store is never touched
    rounds = out["modes"]["serial"]["rounds"]
    assert len(rounds) == 2 and all(r > 0 for r in rounds)
    for rnd in out["raw"]["serial"]:
        assert rnd["runs"] == 4  # the lr grid (2 seeds) and the grown arm (2 seeds), every time
    losses = [sorted((r["arm"], r["seed"], r["final_loss"]) for r in rnd["records"]) for rnd in out["raw"]["serial"]]
    assert losses[0] == losses[1]  # seeded: each round trains the same runs to the same losses
    assert any(line.startswith("serial ") and "1.00x" in line for line in lines)
    arms = out["modes"]["serial"]["per_arm"]
    assert set(arms) == {"s/scratch", "s/half at 50%"}
    assert all(a["tokens_per_s"] > 0 and 0 < a["outside_steps"] < 1 for a in arms.values())
    assert (tmp_path / "bench.json").is_file()


def test_bench_study_copies_keep_the_runs_and_move_their_outputs(tmp_path, demo_data):
    study = small_study(tmp_path, demo_data)
    copy = study_copy(study, tmp_path / "elsewhere", compile=True)
    assert copy.store_path == tmp_path / "elsewhere" / "bench-s.jsonl"
    assert copy.base.train.compile and not study.base.train.compile  # the source is untouched
    mine, theirs = copy.runs("half at 50%", [1], 1e-2)[0].cfg, study.runs("half at 50%", [1], 1e-2)[0].cfg
    assert mine.train.out_dir == "runs/handbook/bench-s/half_at_50_-s1-lr0.01-x1" != theirs.train.out_dir
    mine, theirs = mine.to_dict(), theirs.to_dict()
    for raw in (mine, theirs):
        del raw["train"]["out_dir"], raw["train"]["compile"]
    assert mine == theirs  # the same run otherwise


def test_bench_study_refuses_an_unknown_mode(tmp_path, demo_data):
    study = small_study(tmp_path, demo_data)
    with pytest.raises(ValueError, match="unknown mode.*eager.*choose from serial, jobs, compile"):
        bench_study([str(study.path)], modes=["serial", "eager"])
    with pytest.raises(ValueError, match="--rounds must be >= 1"):
        bench_study([str(load_study(study.path).path)], modes=["serial"], rounds=0)
