"""Triggers on synthetic curves: each fires where expected, honours min/max stage lengths, and decides the same
after a resume from its saved state."""

import json
from dataclasses import fields

import pytest

from nanogrow.triggers import Observation, make_trigger, trigger_from_state


def feed(trig, losses, tokens_per_step=1000, start=0, **extra):
    """Observe a loss curve; return the first step at which the trigger says grow (or None)."""
    for i, loss in enumerate(losses):
        step = start + i
        if trig.should_grow(step, step * tokens_per_step, 0.0):
            return step
        trig.observe(Observation(step + 1, (step + 1) * tokens_per_step, (step + 1) * 1e9, loss, **extra))
    return None


def curve_then_flat(n_fall=100, n_flat=200):
    # loss falls like a power law in tokens, then sits on a plateau
    fall = [2.0 + 5.0 * (i + 1) ** -0.5 for i in range(n_fall)]
    return fall + [fall[-1]] * n_flat


def test_plateau_fires_once_the_curve_flattens():
    trig = make_trigger("plateau", window=20, threshold=0.01, ema=0.0)
    fired = feed(trig, curve_then_flat())
    assert fired is not None and 100 <= fired <= 125  # within a window of the flat part
    assert trig.fired_at == fired


def test_plateau_does_not_fire_while_improving():
    trig = make_trigger("plateau", window=20, threshold=0.01, ema=0.0)
    assert feed(trig, [5.0 * (i + 1) ** -0.5 + 2 for i in range(300)]) is None


def test_min_and_max_stage_lengths_are_honoured():
    flat = [3.0] * 400
    assert feed(make_trigger("plateau", window=10, threshold=0.01, min_steps=150), flat) == 150
    steep = [10.0 - 0.01 * i for i in range(400)]
    assert feed(make_trigger("plateau", window=10, threshold=1e-9, max_steps=80), steep) == 80
    with pytest.raises(ValueError, match="min_steps <= max_steps"):
        make_trigger("plateau", min_steps=10, max_steps=5)


def test_schedule_trigger_fires_at_its_mark():
    assert feed(make_trigger("schedule", at_step=37), [1.0] * 100) == 37
    assert feed(make_trigger("schedule", at_tokens=5500), [1.0] * 100) == 6  # 6 * 1000 >= 5500


@pytest.mark.parametrize("kind,options", [
    ("plateau", dict(window=20, threshold=0.01, ema=0.5)),
    ("scaling-law", dict(window=20, next_params=10**8, B=400.0, beta=0.3)),
])
def test_resumed_trigger_makes_the_same_decision(kind, options):
    losses = curve_then_flat()
    full = make_trigger(kind, **options)
    fired_full = feed(full, losses)
    half = make_trigger(kind, **options)
    assert feed(half, losses[:60]) is None
    state = json.loads(json.dumps(half.state_dict()))  # what a checkpoint stores
    resumed = trigger_from_state(state)
    fired_resumed = feed(resumed, losses[60:], start=60)
    assert fired_full is not None and fired_resumed == fired_full


def test_gradient_trigger_estimates_noise_scale():
    # |G|^2 = 1, tr(S) = B_noise; with micro 1,000 and step 4,000 tokens: E|g_B|^2 = |G|^2 + tr(S) / B
    def obs(step, b_noise):
        small, big = 1000, 4000
        return dict(grad_sq_small=1 + b_noise / small, grad_sq_big=1 + b_noise / big, tokens_small=small,
                    tokens_big=big)

    trig = make_trigger("gradient", threshold=0.5, ema=0.0, window=5)
    for step in range(10):
        trig.observe(Observation(step, step * 4000, 0.0, 1.0, **obs(step, 2000.0)))
    assert trig.last_ratio == pytest.approx(4000 / 2000.0)
    assert not trig.should_grow(10, 40000, 0.0)
    for step in range(10, 20):  # noise grows: the step's batch is now far below the critical batch
        trig.observe(Observation(step, step * 4000, 0.0, 1.0, **obs(step, 40000.0)))
    assert trig.last_ratio == pytest.approx(0.1)
    assert trig.should_grow(20, 80000, 0.0)


def test_scaling_law_trigger_compares_marginal_gains():
    # current model: L = 10 * C^-0.1 in its stage's FLOPs; next: B beta D^(-beta-1) / (6 N)
    trig = make_trigger("scaling-law", window=10, ema=0.0, next_params=1000, B=1.0, beta=0.5)
    trig.observe(Observation(0, 0, 0.0, 12.0))  # the stage starts: its FLOPs count from here
    for i in range(1, 11):
        trig.observe(Observation(i, i * 100, i * 1e6, 10 * (i * 1e6) ** -0.1))
    gain = trig.current_gain()
    assert gain == pytest.approx(10 * 0.1 * (1e7) ** -1.1, rel=1e-6)  # fitted exactly on a pure power law
    assert trig.next_gain(1000) == pytest.approx(0.5 * 1000 ** -1.5 / 6000)
    assert trig.wants_to_grow(11, 1000, 0) == (gain < trig.next_gain(1000))


def test_unknown_trigger_or_option_is_named():
    with pytest.raises(ValueError, match="unknown trigger 'plateu'"):
        make_trigger("plateu")
    with pytest.raises(ValueError, match="unknown option 'windw' for trigger 'plateau'"):
        make_trigger("plateau", windw=3)


def test_curvature_trigger_smooths_the_curvature_share_and_fires_below_threshold():
    trig = make_trigger("curvature", threshold=0.15, every=5, ema=0.5, window=3, min_steps=0)
    assert [s for s in range(12) if trig.needs(s)] == [4, 9]  # the 5th, 10th... step of the stage
    assert trig.needs(4) == {"step-probe"}
    for step, (actual, predicted) in enumerate([(0.5, 1.0), (0.8, 1.0), (0.95, 1.0)]):
        trig.observe(Observation(step, 0, 0.0, 1.0, decrease_actual=actual, decrease_predicted=predicted))
    assert trig.last_kappa == pytest.approx(0.05)
    assert trig.kappa == pytest.approx(0.5 * (0.5 * 0.5 + 0.5 * 0.2) + 0.5 * 0.05)  # 0.2
    assert not trig.should_grow(3, 0, 0.0)
    trig.observe(Observation(4, 0, 0.0, 1.0, decrease_actual=0.99, decrease_predicted=1.0))
    assert trig.kappa == pytest.approx(0.5 * 0.2 + 0.5 * 0.01) and trig.should_grow(5, 0, 0.0)
    trig.observe(Observation(5, 0, 0.0, 1.0))  # steps without a probe change nothing
    trig.observe(Observation(6, 0, 0.0, 1.0, decrease_actual=0.1, decrease_predicted=-1.0))  # an uphill step
    assert trig.probes == 4


def test_every_trigger_names_signals_the_backends_know():
    """A trigger's signals are what the trainer measures for it and what config validation asks the backends
    about: each must be a feature of ``parallel.support``, and only the triggers that read one name one."""
    from nanogrow.parallel.support import LIMITS
    from nanogrow.triggers import TRIGGERS

    for kind, cls in TRIGGERS.items():
        assert cls.signals <= set(LIMITS), kind
        assert "signals" not in {f.name for f in fields(cls)}  # a class property, not a saved option
    assert {k for k, cls in TRIGGERS.items() if cls.signals} == {"gradient", "curvature"}
    assert make_trigger("gradient").needs(0) == {"gradient-noise"} and not make_trigger("plateau").needs(0)
