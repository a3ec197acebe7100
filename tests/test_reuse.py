"""Liew & Kato's reuse law: the fit recovers known parameters, and says when it cannot be fitted."""

from __future__ import annotations

import math
import random

import pytest

from nanogrow.handbook.reuse import Obs, fit_reuse


def law(d1, d2, E=3.0, A=2.0, a1=0.2, a2=0.4, a3=0.05):
    d1, d2 = d1 / 1e6, d2 / 1e6
    return E + A * d1 ** -a1 * d2 ** (-a2 + a3 * math.log(d1))


def synthetic(noise=0.002, seeds=3):
    rng = random.Random(0)
    obs = []
    for total in (2e6, 8e6, 16e6):
        for frac in (0.25, 0.5, 0.75):
            d1 = frac * total
            for s in range(seeds):
                obs.append(Obs("s", f"at {frac}", s, d1, total - d1, law(d1, total - d1) + rng.gauss(0, noise)))
    return obs


def test_the_fit_recovers_a_known_law_and_its_saturation():
    f = fit_reuse("4 x 16", synthetic(), reps=10)
    assert f.points == 9 and len(f.obs) == 27
    assert f.params["E"] == pytest.approx(3.0, abs=0.1)
    assert f.params["a3"] == pytest.approx(0.05, abs=0.03)
    assert f.intervals["a3"][0] > 0  # saturation resolved
    assert f.resid_sd < f.resid_sd_no_a3  # the a3 term is worth its parameter here


def test_too_few_growth_points_are_not_fitted():
    obs = synthetic()[: 5 * 3]  # 5 distinct (D1, D2), 3 seeds each: a five-parameter fit needs 6
    assert fit_reuse("x", obs, reps=5) is None
