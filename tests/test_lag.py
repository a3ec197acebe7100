"""LAG: selection on one process equals applying the winner directly; analysis functions against hand values."""


import math

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


# ---- successive halving -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(1, 5), (2, 3), (3, 4), (6, 8), (12, 5), (5, 1)])
def test_halving_schedule_spends_at_most_lag_at_k_budget(n, k):
    from nanogrow.lag import halving_rounds

    rounds = halving_rounds(n, k)
    assert rounds[0][0] == n and all(s >= 1 for _, s in rounds)
    assert [a for a, _ in rounds[1:]] == [-(-a // 2) for a, _ in rounds[:-1]]  # ceil(half) survive each round
    spent = sum(a * s for a, s in rounds)
    if k >= len(rounds):
        assert spent <= n * k
    assert rounds[-1][0] <= 2
    assert halving_rounds(6, 8) == [(6, 2), (3, 5), (2, 8)]


def test_select_halving_keeps_the_better_half_and_drops_the_rest():
    from nanogrow.lag import Candidate, select_halving

    finals = [3.0, 1.0, 2.5, 0.5, 4.0, 1.5]  # candidate i's loss falls towards finals[i]
    calls = []

    def train(i, cand, steps, state):
        trained = (state or 0) + steps
        calls.append((i, steps, state is None))
        return finals[i] + 1.0 / trained, trained

    cands = [Candidate("stack", {"i": i}) for i in range(6)]
    result, rounds = select_halving(cands, 8, train)
    assert result.winner == 3 and result.states == 2 + 5 + 8
    assert [r["trained"] for r in rounds] == [[0, 1, 2, 3, 4, 5], [1, 3, 5], [1, 3]]
    assert [r["kept"] for r in rounds] == [[1, 3, 5], [1, 3], [3]]
    assert sum(s for _, s, _ in calls) <= 6 * 8
    assert [fresh for _, _, fresh in calls] == [True] * 6 + [False] * 5  # survivors continue, never regrow


def halving_config(data_dir, out_dir, strategy, steps=4):
    return lag_config(data_dir, out_dir, {"lag": {"candidates": CANDIDATES, "steps": steps, "strategy": strategy}})


def test_halving_and_lag_pick_the_same_dominant_candidate():
    """When one candidate is ahead at every step, LAG@k and halving agree (whatever the others do)."""
    from nanogrow.lag import Candidate, select, select_halving

    def loss(i, t):  # candidate 2 dominates; the others cross each other
        return 1.0 + 1.0 / t if i == 2 else 1.5 + (0.3 if (i + t) % 2 else -0.2) + 1.0 / t

    cands = [Candidate("stack", {"i": i}) for i in range(5)]
    lag = select(cands, lambda i, c: ([loss(i, t) for t in range(1, 7)], i))
    half, _ = select_halving(cands, 6, lambda i, c, n, st: (loss(i, (st or 0) + n), (st or 0) + n))
    assert lag.winner == half.winner == 2


def test_halving_in_training_accounts_steps_and_flops(demo_data, tmp_path):
    """LAG@4 and halving with the same budget (3 candidates x 4 steps) on the trainer: the halving winner is the
    best of its last round, it spends no more candidate-steps, and the run pays the FLOPs of every step."""
    runs = {}
    for strategy in ("all", "halving"):
        t = Trainer(halving_config(demo_data, tmp_path / strategy, strategy), log=QUIET)
        run(t, 6)
        runs[strategy] = (t, [h for h in t.history if h["event"] == "grow"][0]["lag"])
    (_, lag_rec), (half_t, half_rec) = runs["all"], runs["halving"]
    last = half_rec["rounds"][-1]
    assert half_rec["winner"] == min(last["trained"], key=lambda i: (last["losses"][str(i)], i))
    # 3 candidates, budget 3 x 4: two rounds, 2 steps for all three, then 3 more for the better two
    assert half_rec["strategy"] == "halving" and [r["steps"] for r in half_rec["rounds"]] == [2, 3]
    kept = half_rec["rounds"][0]["kept"]
    assert half_rec["steps_per_candidate"] == [5 if i in kept else 2 for i in range(3)]
    assert sum(half_rec["steps_per_candidate"]) <= 3 * 4 == sum(lag_rec["steps_per_candidate"])
    # the FLOPs of a candidate are its steps at the grown shape; the run pays for all of them
    spent, steps = half_rec["flops_per_candidate"], half_rec["steps_per_candidate"]
    per_step = spent[0] / steps[0]
    assert all(f == pytest.approx(per_step * n) for f, n in zip(spent, steps))
    small = Trainer(halving_config(demo_data, tmp_path / "small", "all"), log=QUIET)
    run(small, 3)  # the three steps before the growth event
    assert half_t.meter.total_flops == pytest.approx(small.meter.total_flops + sum(spent) + 3 * per_step)
    assert half_t.step == 3 + 5 + 3  # the winner's 5 steps are kept, then three ordinary steps
    # every evaluation has its standard error over the validation batches
    assert all(len(se) == len(c) and all(s > 0 for s in se) for se, c in zip(half_rec["eval_se"], half_rec["curves"]))
    # ... and the winner's difference from the runner-up (the other finalist) its own
    assert 0 < half_rec["paired_se"] < math.inf


def test_halving_selection_interrupted_then_resumed_matches_the_uninterrupted_run(demo_data, tmp_path):
    full = Trainer(halving_config(demo_data, tmp_path / "full", "halving"), log=QUIET)
    full_losses = run(full, 8)

    first = Trainer(halving_config(demo_data, tmp_path / "split", "halving"), log=QUIET)
    run(first, 3)
    first.save()  # the last checkpoint before the growth event
    calls = {"n": 0}
    real_step = first.train_step

    def crash_in_round_two():
        calls["n"] += 1
        if calls["n"] == 8:  # round 1 is 3 x 2 steps; this is inside round 2
            raise KeyboardInterrupt
        return real_step()

    first.train_step = crash_in_round_two
    with pytest.raises(KeyboardInterrupt):
        run(first, 1)
    del first
    second = Trainer(halving_config(demo_data, tmp_path / "split", "halving"), resume="auto", log=QUIET)
    assert second.step == 3
    assert run(second, 5) == full_losses[3:]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k
    assert second.meter.total_flops == full.meter.total_flops


def test_halving_refuses_process_groups(demo_data, tmp_path):
    from nanogrow.config import ConfigError

    with pytest.raises(ConfigError, match="halving"):
        lag_config(demo_data, tmp_path, {"lag": {"candidates": CANDIDATES, "steps": 2, "strategy": "halving",
                                                 "groups": 2}})
    with pytest.raises(ConfigError, match="strategy"):
        lag_config(demo_data, tmp_path, {"lag": {"candidates": CANDIDATES, "steps": 2, "strategy": "bandit"}})


def test_paired_standard_error_of_the_winner_against_the_runner_up():
    """The winner's and runner-up's per-batch losses share the batches' difficulty: the s.e. of their difference is
    computed from the per-batch differences (here constant, so ~0) and only over candidates trained as long."""
    import math
    import statistics

    from nanogrow.lag import LagResult
    from nanogrow.lag import paired_se as _paired_se

    batches = {0: [3.0, 5.0, 4.0, 6.0], 1: [3.1, 5.1, 4.1, 6.1], 2: [2.0, 9.0, 1.0, 7.0]}
    result = LagResult(0, [[4.6, 4.5], [4.7, 4.6], [4.8]], None)
    assert _paired_se(result, [5, 5, 2], batches) == pytest.approx(0.0, abs=1e-12)  # candidate 2 stopped at 2 steps
    spread = statistics.stdev([3.0, 5.0, 4.0, 6.0]) / 2
    assert spread > 0.6  # (the unpaired s.e. of the winner's loss)
    assert math.isnan(_paired_se(result, [5, 2, 2], batches))  # nobody trained as long as the winner
