"""What each parallelism can do, written once: config validation asks ``refusal`` before any compute, and the
training backends answer ``supports`` from the same table, so a limit of a backend is not a rule scattered through
the config code (issue #28).

A feature is named by what it needs from the backend, not by the option that asks for it: several options can
need one feature (``per-element-lr``: Variance-Transfer lr scales and the new-parameter lr multiplier), and a
trigger names the signals it reads (``triggers.Trigger.signals``), which are features too.
"""

from __future__ import annotations

PARALLELISMS = ("none", "ddp", "fsdp", "deepspeed")

# feature -> {parallelism that lacks it: why}. A parallelism not listed supports the feature.
LIMITS: dict[str, dict[str, str]] = {
    "skip-nonfinite-step": {
        "deepspeed": "DeepSpeed steps inside backward, so an update cannot be withheld"},
    "optimizer-ages": {
        "deepspeed": "ZeRO keeps one Adam step count per flat partition, not per element"},
    "per-element-lr": {
        "fsdp": "per-element lr scales need full tensors",
        "deepspeed": "per-element lr scales need optimizer state ZeRO does not keep"},
    "lag": {
        "deepspeed": "LAG trains candidates from one saved model and optimizer"},
    "learned-growth": {
        "deepspeed": "fitting its maps reads the old weights whole, which ZeRO 3 partitions"},
    "replicate": {
        "deepspeed": "replicate > 1 is FSDP2's HSDP"},
    # Signals a trigger reads (triggers.Trigger.signals).
    "gradient-noise": {
        "deepspeed": "it reads full gradients, which ZeRO partitions"},
    "step-probe": {
        "fsdp": "its probe multiplies whole gradients and updates",
        "deepspeed": "it reads gradients and updates whole, and DeepSpeed owns the step"},
}

# The package a parallelism needs beyond torch, and how to install it.
PACKAGES = {"deepspeed": ("deepspeed", "DS_BUILD_OPS=0 pip install deepspeed")}


def supports(parallel: str, feature: str) -> bool:
    """Can ``parallel`` (none | ddp | fsdp | deepspeed; "auto" resolves to none or ddp, which support everything)
    do ``feature``?"""
    if feature not in LIMITS:
        raise KeyError(f"unknown feature {feature!r}; known: {', '.join(sorted(LIMITS))}")
    return parallel not in LIMITS[feature]


def refusal(parallel: str, feature: str, asked_by: str, instead: str = "") -> str | None:
    """The error text for a config whose ``asked_by`` (e.g. "stage[1].trigger='curvature'") needs ``feature``
    under ``parallel``, or None when ``parallel`` supports it. ``instead`` names an alternative besides another
    parallelism."""
    if supports(parallel, feature):
        return None
    able = [p for p in PARALLELISMS if supports(p, feature)]
    alternatives = [f"train.parallel={' or '.join(map(repr, able))}"] + ([instead] if instead else [])
    return (f"{asked_by} is not supported with train.parallel={parallel!r} ({LIMITS[feature][parallel]}); use "
            f"{', or '.join(alternatives)}")
