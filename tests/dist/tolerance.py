"""Tolerances for comparing a multi-process run with its one-process reference, derived rather than guessed.

Two runs that differ only in how fp32 sums are ordered (a gradient all-reduced over ranks vs summed over one batch;
a sharded vs a whole matmul) give gradients that differ by rounding: |dg| <= n * u * sum|x_i| with u = 2**-24, about
1e-7 relative for the sums here. Adam normalises each element by its own gradient scale, update = lr * m / (sqrt(v)
+ eps), so an element whose gradient is a near-cancellation (|g| << sum|x_i|) turns that rounding into a large
*relative* change of its update, but never more than the update itself: at most ~lr per step. Within a handful of
steps only a few elements are that close to cancelling, and they move by a small fraction of one step.

So the state tolerance is ``KAPPA * lr * steps``: reduction order may move any element by at most KAPPA (0.25%) of
one Adam step per step taken. Measured on one AMD EPYC (tests/dist/worker.py's tiny model, lr 1e-2, 4 steps, the
batch split over ranks and the gradients averaged in another order): 6.2e-6 with 2 ranks and 3.6e-5 with 3 (the
Intel Xeon kind read 1.06e-5 at 2), against a bound of 1e-4. A real bug is far outside it: a missed all-reduce (each
rank steps on its own part of the batch) moved elements by 7.8e-2 in the same 4 steps (Adam moves every element by
O(lr) per step), a wrong shard by the parameter scale (0.05-1), weight decay skipped on a shard by lr * wd * |w| per
step (1e-3 * |w|: 1e-4 after 4 steps on a unit gain).

Losses are O(ln vocab) ~ 4, where one fp32 ulp is 2**-21 (4.8e-7). They differ by the reduction order of the loss
itself (a few ulps) plus the first-order effect of the weight drift above, which stays within a few ulps per step at
these sizes: the tolerance is LOSS_ULPS_PER_STEP ulps per step (measured: 9.5e-7 after 8 steps at 3 ranks; a missed
all-reduce: 3.8e-2).

Gradients accumulated with a reduction on every micro-batch vs once at the end add the same n = world x accum
terms g_i (each computed identically in both runs) in two orders; each order's sum is within (n - 1) u sum|g_i|
of the exact one, and the average over ranks divides by the world size (exact for a power of two), so they differ
by at most 2 (n - 1) u sum|g_i| / world, element by element. A missed reduction is off by O(|g|)."""

from __future__ import annotations

KAPPA = 2.5e-3             # fraction of one Adam step that reduction order may move an element, per step
LOSS_ULP = 2.0 ** -21      # fp32 spacing at losses in [4, 8)
LOSS_ULPS_PER_STEP = 4


def state_tol(lr: float, steps: int) -> float:
    """Largest allowed |difference| of a parameter or Adam moment after ``steps`` steps at learning rate ``lr``."""
    return KAPPA * lr * max(steps, 1)


# How many elements a comparison lets past ``state_tol``: those whose gradient is a near-cancellation. Measured: after
# LAG across 2 process groups (tests/test_lag_groups.py, whose candidates train on the stream after the selection's
# held-out batches), one element of the token embedding (a row whose gradient nearly cancels: Adam's exp_avg -4.5e-5,
# exp_avg_sq 1.0e-8) moved 2.6e-4 (DDP, 2 x 1 process) and 2.4e-4 (FSDP, 2 x 2) after 8 steps at lr 1e-2, every
# other element under 1e-5. Such an element still moves by at most about its own updates, lr per step.
NEAR_CANCELLING = 1e-5     # fraction of a state's elements (at least one) allowed between state_tol and lr * steps


def state_outliers(got: dict, want: dict, lr: float, steps: int) -> tuple[int, int, float]:
    """(elements of ``got`` farther than ``state_tol`` from ``want``'s, how many may be: NEAR_CANCELLING of all, at
    least one, largest difference); ``got`` and ``want``: name -> tensor, the same names. A candidate trained on
    the wrong rows or an unreduced gradient moves most elements by O(lr), far past both counts."""
    import torch

    diffs = torch.cat([(got[k].double() - want[k].double()).abs().reshape(-1) for k in want])
    beyond = int((diffs > state_tol(lr, steps)).sum())
    return beyond, max(1, int(NEAR_CANCELLING * diffs.numel())), float(diffs.max())


def loss_tol(steps: int) -> float:
    """Largest allowed |difference| of a training loss after ``steps`` optimizer steps (losses of order 4)."""
    return LOSS_ULPS_PER_STEP * LOSS_ULP * max(steps, 1)


def grad_tol(abs_sum, n_terms: int, world: int):
    """Largest allowed |difference|, element by element, of two accumulated gradients that add the same
    ``n_terms`` terms in different orders; ``abs_sum`` is the sum of the terms' absolute values (tensor or float)."""
    return 2 * max(n_terms - 1, 1) * 2.0 ** -24 * abs_sum / world
