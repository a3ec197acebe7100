"""When to grow, decided in advance: stage boundaries from a budget.

Stage 0 is the starting shape; stage k >= 1 begins with the k-th growth event. Every allocation below is a weight
w_k per stage, turned into optimizer steps ``steps_k = max_steps * w_k / sum(w)``, so the run's step budget (and
with it the learning-rate schedule) is exactly the configured one even when stages use different batch sizes:

    equal-tokens   every stage trains on the same number of tokens:   w_k = 1 / tokens_per_step_k
    equal-flops    every stage spends the same compute:               w_k = 1 / (tokens_per_step_k * flops_per_token_k)
    exponential    stage k sees r times the tokens of stage k-1:      w_k = r**k / tokens_per_step_k

``exponential`` is the analogue of the Variance-Transfer paper's epoch scheduler (Yuan et al. 2023, Eq. 7,
seed 003): later, larger stages train longer; r = 1 gives equal-tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .model import ModelConfig


def stage_weights(kind: str, tokens_per_step: list[int], flops_per_token: list[float],
                  exp_ratio: float = 2.0) -> list[float]:
    if kind == "equal-tokens":
        return [1.0 / t for t in tokens_per_step]
    if kind == "equal-flops":
        return [1.0 / (t * f) for t, f in zip(tokens_per_step, flops_per_token)]
    if kind == "exponential":
        return [exp_ratio ** k / t for k, t in enumerate(tokens_per_step)]
    raise ValueError(f"unknown stage schedule {kind!r}; known: equal-tokens, equal-flops, exponential")


def stage_start_steps(kind: str, max_steps: int, tokens_per_step: list[int], flops_per_token: list[float],
                      exp_ratio: float = 2.0) -> list[int]:
    """First step of every stage after stage 0 (one per growth event), strictly increasing, in (0, max_steps)."""
    w = stage_weights(kind, tokens_per_step, flops_per_token, exp_ratio)
    total, acc, starts = sum(w), 0.0, []
    for wk in w[:-1]:
        acc += wk
        starts.append(round(max_steps * acc / total))
    for i, s in enumerate(starts):
        lo = (starts[i - 1] + 1) if i else 1
        if not lo <= s < max_steps:
            raise ValueError(f"{kind} schedule over {max_steps} steps gives stage {i + 1} no steps "
                             f"(boundaries {starts}); raise train.max_steps or use fewer stages")
    return starts


def exponential_shapes(start: ModelConfig, target: ModelConfig, n_stages: int, fields: tuple[str, ...] = ("d_ff",),
                       multiple: int = 8) -> list[ModelConfig]:
    """Shapes growing geometrically from ``start`` to ``target`` over ``n_stages`` (the Variance-Transfer paper's
    architecture scheduler, Eq. 6: C_t = C_0 * (C_T / C_0)^(t / T)), each field rounded to ``multiple``
    (n_layer: to an integer). Returns n_stages + 1 shapes, first = start and last = target."""

    s, t = start.resolved(), target.resolved()
    shapes = []
    for k in range(n_stages + 1):
        changes = {}
        for f in fields:
            a, b = getattr(s, f), getattr(t, f)
            v = a * (b / a) ** (k / n_stages)
            m = 1 if f in ("n_layer", "n_head", "n_kv_head") else multiple
            changes[f] = b if k == n_stages else max(a, int(round(v / m)) * m)
        shapes.append(replace(s, **changes))
    return shapes


# ---- what every stage trains: shape, batch shape, context -------------------------------------------------------

@dataclass(frozen=True)
class StageLayout:
    """What stage k trains: its model shape (``model.max_seq_len`` included), the per-rank micro-batch and the
    training sequence length. One source of truth for the trainer (batch shape, RoPE length, schedule
    boundaries), the config check and the benchmarks."""

    model: ModelConfig
    micro_batch: int
    seq_len: int

    def tokens_per_step(self, world: int = 1, grad_accum: int = 1) -> int:
        return world * self.micro_batch * self.seq_len * grad_accum

    def flops_per_token(self) -> float:
        """Training FLOPs per token at this stage's own sequence length (the attention term grows with it)."""
        return self.model.flops_per_token(self.seq_len)


def stage_layouts(model: ModelConfig, seq_len: int, micro_batch: int, stages: list) -> list[StageLayout]:
    """Layouts of stage 0 (``model``, ``data.seq_len``, ``train.micro_batch``) and of every [[stage]] after it:
    each stage inherits what it does not change (``shape`` fields, ``micro_batch = 0``, ``seq_len = 0``)."""
    out = [StageLayout(model.resolved(), micro_batch, seq_len)]
    for st in stages:
        prev = out[-1]
        out.append(StageLayout(replace(prev.model, **st.shape).resolved(), st.micro_batch or prev.micro_batch,
                               st.seq_len or prev.seq_len))
    return out
