"""LAG: selection on one process equals applying the winner directly (after the held-out batches it scores on);
every FLOP of the selection is charged; analysis functions against hand values."""


import dataclasses
import json
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


def skip_held_out(trainer, n=4):
    """An ``on_grow`` for a run that applies a LAG winner directly: it skips the ``n`` micro-batches a LAG run holds
    out of its training stream at that growth, so both train on the same batches after it."""
    def on_grow(event):
        for _ in range(n):
            trainer.loader.next_batch()
    return on_grow


def run_skipping(trainer, n_turns, n_held_out=4):
    return [trainer.advance(on_grow=skip_held_out(trainer, n_held_out)) for _ in range(n_turns)]


def scoring_flops(record):
    return sum(record["score_flops_per_candidate"])


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
    direct_losses = run_skipping(direct, 11)  # the LAG run never trains on the 4 batches it scored on
    assert lag_losses[:3] == direct_losses[:3]
    assert lag_losses[3:] == direct_losses[6:]  # LAG's k steps of the winner are kept, not thrown away
    a, b = lag.model.state_dict(), direct.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the losers' FLOPs and every scoring pass are charged to the run's total, as its selection
    per_cand = event["lag"]["flops_per_candidate"]
    selection = sum(per_cand) - per_cand[winner] + scoring_flops(event["lag"])
    assert lag.meter.total_flops == pytest.approx(direct.meter.total_flops + selection)
    assert lag.meter.flops_by["selection"] == pytest.approx(selection) == event["lag"]["selection_flops"]
    assert lag.meter.flops_by["train"] == pytest.approx(direct.meter.flops_by["train"])


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
    direct_losses = run_skipping(direct, 11)
    assert lag_losses[:3] == direct_losses[:3]
    assert lag_losses[3:6] == direct_losses[5:8]  # each winner's 2 LAG steps are kept: direct steps 4-5 and 9-10
    assert lag_losses[6] == direct_losses[10]
    a, b = lag.model.state_dict(), direct.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losers = sum(sum(f) - f[e["lag"]["winner"]] for e in events for f in [e["lag"]["flops_per_candidate"]])
    scoring = sum(scoring_flops(e["lag"]) for e in events)
    assert lag.meter.total_flops == pytest.approx(direct.meter.total_flops + losers + scoring)


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
    assert half_t.meter.total_flops == pytest.approx(small.meter.total_flops + sum(spent) + 3 * per_step
                                                     + scoring_flops(half_rec))
    assert half_t.step == 3 + 5 + 3  # the winner's 5 steps are kept, then three ordinary steps
    # every score has its standard error over the held-out batches
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


# ---- what a selection costs, and what it is scored on ---------------------------------------------------------

@pytest.mark.parametrize("strategy", ["all", "halving"])
def test_lag_charged_flops_are_its_steps_and_scoring_passes_counted_from_the_config(demo_data, tmp_path, strategy):
    """A LAG run's charged FLOPs, counted here from the config alone: every step the run keeps (3 at 2 layers, then
    max_steps - 3 at 4 layers, the winner's candidate steps among them), every step of the losers, and a forward
    pass (a third of 6N + attention per token) over score_batches x micro_batch x seq_len tokens per scoring.
    Evaluation for reporting (before / after the growth, the final one) is counted apart and not charged."""
    from nanogrow.lag import halving_rounds
    from nanogrow.metrics import CHARGED

    n, k, score_batches, every = len(CANDIDATES), 4, 2, 2
    lag = {"candidates": CANDIDATES, "steps": k, "strategy": strategy, "score_batches": score_batches,
           "eval_every": every}
    cfg = lag_config(demo_data, tmp_path / "run", {"lag": lag})
    summary = Trainer(cfg, log=QUIET).run()

    small, big = cfg.model, dataclasses.replace(cfg.model, n_layer=4)
    fpt_small, fpt_big = small.flops_per_token(64), big.flops_per_token(64)
    step_tokens = 4 * 64  # micro_batch x seq_len, one process, no accumulation
    score_tokens = score_batches * 4 * 64
    if strategy == "all":
        candidate_steps, winner_steps, scorings = n * k, k, n * (k // every)
    else:
        rounds = halving_rounds(n, k)
        candidate_steps, winner_steps = sum(a * s for a, s in rounds), sum(s for _, s in rounds)
        scorings = sum(a for a, _ in rounds)  # once per candidate per round
    train = 3 * step_tokens * fpt_small + (cfg.train.max_steps - 3) * step_tokens * fpt_big
    losers = (candidate_steps - winner_steps) * step_tokens * fpt_big
    scoring = scorings * score_tokens * fpt_big / 3
    evals = 2 * 4 * 64 * (fpt_small + 2 * fpt_big) / 3  # eval_batches x eval_batch_size x seq: before, after, end

    assert summary["steps"] == cfg.train.max_steps
    assert summary["flops_by"]["train"] == pytest.approx(train)
    assert summary["flops_by"]["selection"] == pytest.approx(losers + scoring)
    assert summary["flops"] == pytest.approx(train + losers + scoring)
    assert summary["flops"] == pytest.approx(sum(summary["flops_by"][c] for c in CHARGED))
    assert summary["flops_by"]["eval"] == pytest.approx(evals)
    assert summary["flops_by"]["probe"] == summary["flops_by"]["fit"] == 0.0
    assert summary["flops_share"]["selection"] == pytest.approx((losers + scoring) / summary["flops"])
    # the same breakdown in summary.json, metrics.jsonl's evaluations and the growth event's record
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["flops_by"] == summary["flops_by"]
    last_eval = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in line][-1]
    assert last_eval["flops_by"] == summary["flops_by"] and last_eval["flops"] == summary["flops"]
    record = [h for h in json.loads((tmp_path / "run" / "summary.json").read_text())["growth_events"]][0]["lag"]
    assert record["selection_flops"] == pytest.approx(losers + scoring)
    assert sum(record["score_flops_per_candidate"]) == pytest.approx(scoring)
    assert record["score_tokens"] == score_tokens and record["score_batches"] == score_batches
    assert 0 <= record["selection_seconds"]


def test_lag_scores_on_held_out_training_batches_never_on_validation(demo_data, tmp_path, monkeypatch):
    """The selection's batches are the training stream's next micro-batches at the growth (the train split, not
    val), disjoint from every validation sequence, the same for every candidate, and the run never trains on them:
    the candidates and the run after the selection continue from the stream right after them."""
    from nanogrow.data import TokenLoader
    from nanogrow.growth import GrowthController
    from nanogrow.lag_runner import CandidateRunner

    held, scored_on, passes = [], [], []  # passes: (inside the selection?, the batches) of every forward pass
    real_draw, real_score = CandidateRunner.selection_batches, CandidateRunner.score
    real_select, real_loss = GrowthController.lag_select, Trainer.local_val_loss

    def draw(self, n):
        batches = real_draw(self, n)
        held.append(batches)
        return batches

    def score(self, batches):
        scored_on.append(batches)
        return real_score(self, batches)

    def select(self, *args):
        passes.append(("start", None))
        try:
            return real_select(self, *args)
        finally:
            passes.append(("end", None))

    def loss(self, batches):
        passes.append(("pass", batches))
        return real_loss(self, batches)

    monkeypatch.setattr(CandidateRunner, "selection_batches", draw)
    monkeypatch.setattr(CandidateRunner, "score", score)
    monkeypatch.setattr(GrowthController, "lag_select", select)
    monkeypatch.setattr(Trainer, "local_val_loss", loss)
    cfg = lag_config(demo_data, tmp_path / "run", {"lag": {"candidates": CANDIDATES, "steps": 2,
                                                           "score_batches": 3}})
    trainer = Trainer(cfg, log=QUIET)
    run(trainer, 4)  # 3 steps, then the growth event with its selection (2 steps per candidate), then a step

    assert len(held) == 1 and len(held[0]) == 3
    assert all(b is held[0] for b in scored_on) and len(scored_on) == 3 * 2  # every candidate, every step
    # Every forward pass inside the selection is on the held-out batches; validation is read only outside it, for
    # reporting (the losses just before and after the growth event)
    kinds = [k for k, _ in passes]
    inside = passes[kinds.index("start") + 1:kinds.index("end")]
    assert len(inside) == 6 and all(b is held[0] for _, b in inside)
    outside = [b for k, b in passes[:kinds.index("start")] + passes[kinds.index("end") + 1:] if k == "pass"]
    assert len(outside) == 2 and all(b is trainer.val for b in outside)
    rows = lambda batches: {tuple(r.tolist()) for x, _ in batches for r in x}  # noqa: E731
    assert not rows(held[0]) & rows(trainer.val)
    # the same rows as a fresh reader of the train split yields after the 3 steps before the growth
    stream = TokenLoader(demo_data, "train", 64, 4, seed=cfg.data.seed, vocab_size=512)
    trained = [stream.next_batch() for _ in range(3)]
    assert [torch.equal(x, h[0].cpu()) for x, h in zip([stream.next_batch()[0] for _ in range(3)], held[0])] == \
        [True] * 3
    assert not rows(held[0]) & rows(trained)
    # ... and after them come the winner's 2 steps and the step after the selection: nothing is read twice
    assert trainer.loader.tokens_consumed == (3 + 3 + 2 + 1) * 4 * 64
    assert trainer.step == 3 + 2 + 1


def test_lag_scoring_config_errors_name_the_key(demo_data, tmp_path):
    from nanogrow.config import ConfigError

    with pytest.raises(ConfigError, match=r"stage\[1\]\.lag\.eval_batches was replaced by stage\[1\]\.lag\.score"):
        lag_config(demo_data, tmp_path, {"lag": {"candidates": CANDIDATES, "steps": 2, "eval_batches": 4}})
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match=r"stage\[1\]\.lag\.score_batches must be a positive integer"):
            lag_config(demo_data, tmp_path, {"lag": {"candidates": CANDIDATES, "steps": 2, "score_batches": bad}})
