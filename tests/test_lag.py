"""LAG: selection on one process equals applying the winner directly; analysis functions against hand values."""


import pytest
import torch

from nanogrow.lag import (correlation_heatmap, correlation_with_final, first_step_above, pearson, recall_at_k, regret,
                          select_from_losses, spearman)
from nanogrow.train import Trainer

from helpers import run_steps as run
from helpers import tiny_run_config, with_stages

QUIET = lambda *_: None  # noqa: E731
CANDIDATES = [{"op": "lag", "options": {"start": 1, "block": 1, "init": "random"}},
              {"op": "stack"},
              {"op": "identity", "options": {"positions": [0, 1]}}]


def lag_config(data_dir, out_dir, stage):
    cfg = tiny_run_config(data_dir, out_dir)
    cfg.model.n_layer = 2
    return with_stages(cfg, [dict({"shape": {"n_layer": 4}, "at_step": 3}, **stage)], lr_policy="continue")


def test_lag_picks_lowest_loss_and_continues_like_the_direct_operator(demo_data, tmp_path):
    lag = Trainer(lag_config(demo_data, tmp_path / "lag", {"lag": {"candidates": CANDIDATES, "steps": 3}}), log=QUIET)
    lag_losses = run(lag, 8)  # 3 before, growth + 3 LAG steps (inside the event), then 5 more
    event = [h for h in lag.history if h["event"] == "grow"][0]
    curves = event["lag"]["curves"]
    winner = event["lag"]["winner"]
    assert len(curves) == 3 and all(len(c) == 3 for c in curves)
    assert winner == min(range(3), key=lambda i: curves[i][-1])
    assert lag.step == 11 and lag.model_config.n_layer == 4

    chosen = CANDIDATES[winner]
    direct = Trainer(lag_config(demo_data, tmp_path / "direct",
                                {"op": chosen["op"], "options": chosen.get("options", {})}), log=QUIET)
    direct_losses = run(direct, 11)
    assert lag_losses[:3] == direct_losses[:3]
    assert lag_losses[3:] == direct_losses[6:]  # LAG's k steps of the winner are kept, not thrown away
    a, b = lag.model.state_dict(), direct.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the losers' FLOPs are counted in the run's total
    per_cand = event["lag"]["flops_per_candidate"]
    assert lag.meter.total_flops == pytest.approx(direct.meter.total_flops + sum(per_cand) - per_cand[winner])


def test_adaptive_stacking_lag_at_every_stage_equals_its_winners_applied_directly(demo_data, tmp_path):
    """Adaptive stacking (LAG paper section 4.2): LAG at every stage of a gradual-stacking schedule, 2 -> 3 -> 4
    layers over the design space (copy and random inits). Each stage keeps its winner's k steps, and the whole run
    equals the schedule that applies the two winners directly; both stages' losers' FLOPs are counted."""
    def config(out, stage_opts):
        cfg = tiny_run_config(demo_data, tmp_path / out)
        cfg.model.n_layer = 2
        shapes = [({"n_layer": 3}, 3), ({"n_layer": 4}, 8)]
        stages = [dict({"shape": sh, "at_step": at}, **opt) for (sh, at), opt in zip(shapes, stage_opts)]
        return with_stages(cfg, stages, lr_policy="continue")

    lag_opt = {"lag": {"candidates": "design-space", "steps": 2}}
    lag = Trainer(config("adaptive", [lag_opt, lag_opt]), log=QUIET)
    lag_losses = run(lag, 7)  # steps 1-3, LAG (steps 4-5 inside the event), 6-8, LAG (9-10), 11
    events = [h for h in lag.history if h["event"] == "grow"]
    assert len(events) == 2 and lag.model_config.n_layer == 4 and lag.step == 11
    assert [len(e["lag"]["candidates"]) for e in events] == [4, 6]  # L->L+1: starts 1..L x block 1 x copy/random
    winners = [e["lag"]["candidates"][e["lag"]["winner"]] for e in events]

    direct = Trainer(config("direct", [{"op": w["op"], "options": w["options"]} for w in winners]), log=QUIET)
    direct_losses = run(direct, 11)
    assert lag_losses[:3] == direct_losses[:3]
    assert lag_losses[3:6] == direct_losses[5:8]  # each winner's 2 LAG steps are kept: direct steps 4-5 and 9-10
    assert lag_losses[6] == direct_losses[10]
    a, b = lag.model.state_dict(), direct.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losers = sum(sum(f) - f[e["lag"]["winner"]] for e in events for f in [e["lag"]["flops_per_candidate"]])
    assert lag.meter.total_flops == pytest.approx(direct.meter.total_flops + losers)


def test_lag_design_space_candidates(demo_data, tmp_path):
    cfg = lag_config(demo_data, tmp_path, {"lag": {"candidates": "design-space", "steps": 1}})
    trainer = Trainer(cfg, log=QUIET)
    run(trainer, 4)
    event = [h for h in trainer.history if h["event"] == "grow"][0]
    assert len(event["lag"]["candidates"]) == 4  # 2 -> 4: start 1 (only), block 1 or 2, copy or random
    assert trainer.model_config.n_layer == 4


def test_select_from_losses_breaks_ties_by_order():
    assert select_from_losses([3.0, 2.0, 2.0, 5.0]) == 1


def test_correlations_against_hand_values():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    # ranks x = [1, 2, 3], y = [1, 3, 2]: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 24 = 0.5
    assert spearman([10, 20, 30], [5, 9, 7]) == pytest.approx(0.5)


def test_recall_and_regret_against_hand_values():
    # three candidates, three evaluations; finals: c0 = 3.0 (worst), c1 = 1.0 (best), c2 = 2.0
    curves = [[1.0, 2.0, 2.9], [3.0, 1.5, 1.1], [2.0, 1.9, 2.1]]
    finals = [3.0, 1.0, 2.0]
    assert recall_at_k(curves, finals, 1) == [0, 1, 1]
    assert recall_at_k(curves, finals, 2) == [0, 1, 1]
    reg, rel = regret(curves, finals)
    assert reg == [2.0, 0.0, 0.0]  # at t=0 the lowest loss is c0, whose final is 3.0: regret 3.0 - 1.0
    assert rel == [1.0, 0.0, 0.0]
    corr = correlation_with_final(curves, finals)
    assert corr[-1] == pytest.approx(1.0) and corr[0] == pytest.approx(-1.0)  # ranks (1, 3, 2) vs (3, 1, 2)
    heat = correlation_heatmap(curves)
    assert heat[0][0] == pytest.approx(1.0) and heat[0][2] == pytest.approx(heat[2][0])
    assert first_step_above(corr, 0.8) == 1


def test_bench_lag_and_lag_report(demo_data, tmp_path, capsys):
    import json

    from nanogrow.bench import lag as bench_lag
    from nanogrow.cli import main

    cfg = tiny_run_config(demo_data, tmp_path)
    cfg.model.n_layer = 2
    cfg.train.max_steps = 7
    cfg = with_stages(cfg, [{"shape": {"n_layer": 3}, "at_step": 3,
                             "lag": {"candidates": "design-space", "steps": 1, "eval_every": 2}}])
    out = bench_lag(cfg, out_json=str(tmp_path / "lag.json"), log=QUIET)
    record = json.loads((tmp_path / "lag.json").read_text())
    assert len(record["curves"]) == 4 and all(len(c) == 2 for c in record["curves"])  # 4 steps, every 2
    assert out["steps"] == [2, 4] and out["relative_regret"][-1] == 0.0
    assert main(["lag-report", str(tmp_path)]) == 0
    assert "relative regret" in capsys.readouterr().out
