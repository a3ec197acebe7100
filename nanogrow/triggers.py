"""When to grow, decided while training: triggers that watch the run and say "grow now".

Every trigger sees the same observations after each optimizer step (step, tokens, FLOPs, training loss and, for
``gradient``, gradient-noise statistics), keeps only JSON-able state (so a resumed run makes the same decisions),
and honours minimum and maximum stage lengths (in steps, counted from the start of its stage):

    schedule     grow at a fixed step / token / FLOP count (the stage boundaries of the schedule helpers)
    plateau      grow when the loss stops improving: the least-squares slope of the smoothed loss against
                 log(tokens) (or tokens) over a window falls below a threshold
    gradient     grow when the gradient's signal-to-noise ratio B / B_noise falls below a threshold (see
                 ``GradientTrigger``)
    scaling-law  grow when the current model's marginal loss gain per FLOP, from a power law fitted online to its
                 own curve, drops below what the next, larger shape is predicted to deliver by a size-dependent law
    curvature    grow when the loss decrease of a step falls well short of its first-order prediction: the
                 optimizer's steps are curvature-limited (see ``CurvatureTrigger``)
"""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar


@dataclass
class Observation:
    step: int
    tokens: int
    flops: float
    loss: float
    grad_sq_small: float | None = None  # |g|^2 of one micro-batch's gradient (gradient trigger)
    grad_sq_big: float | None = None  # |g|^2 of the whole step's accumulated gradient
    tokens_small: int = 0  # tokens behind grad_sq_small
    tokens_big: int = 0  # tokens behind grad_sq_big
    decrease_actual: float | None = None  # curvature trigger: L(theta) - L(theta + delta) on the step's batch
    decrease_predicted: float | None = None  # -g . delta, the first-order prediction of that decrease


@dataclass
class Trigger(abc.ABC):
    """Base: stage-length bounds and the decision. ``min_steps`` / ``max_steps`` count from ``start_step``."""

    min_steps: int = 0
    max_steps: int = 0  # 0: no maximum
    start_step: int = 0
    fired_at: int = -1  # step at which the trigger fired (-1: not yet)

    kind = "base"
    # What the trigger reads beyond step, tokens, FLOPs and loss: signals the trainer measures only for a trigger
    # that names them (each costs compute), and that the backend must be able to give (``parallel.support``).
    #   gradient-noise  the first micro-batch's gradient norm beside the whole step's (grad_sq_small / grad_sq_big)
    #   step-probe      the step's own batches re-evaluated after the update (decrease_actual / _predicted)
    signals: ClassVar[frozenset[str]] = frozenset()

    def needs(self, step: int) -> frozenset[str]:
        """The signals to measure on the step about to be taken (0-based ``step``): all of ``signals`` unless the
        trigger samples them."""
        return self.signals

    def validate(self) -> None:
        if self.min_steps < 0 or self.max_steps < 0 or (self.max_steps and self.max_steps < self.min_steps):
            raise ValueError(f"{self.kind} trigger: need 0 <= min_steps <= max_steps (0 = no max), got "
                             f"min_steps={self.min_steps}, max_steps={self.max_steps}")

    def observe(self, obs: Observation) -> None:
        """Record what happened at the end of a step."""

    @abc.abstractmethod
    def wants_to_grow(self, step: int, tokens: int, flops: float) -> bool:
        """The trigger's own criterion, before the stage-length bounds."""

    def should_grow(self, step: int, tokens: int, flops: float) -> bool:
        """The decision before step ``step``: the trigger's own criterion, clamped by the stage-length bounds."""
        length = step - self.start_step
        if length < self.min_steps:
            return False
        fire = (self.max_steps and length >= self.max_steps) or self.wants_to_grow(step, tokens, flops)
        if fire and self.fired_at < 0:
            self.fired_at = step
        return bool(fire)

    def state_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass
class ScheduleTrigger(Trigger):
    at_step: int = -1
    at_tokens: int = -1
    at_flops: float = -1.0

    kind = "schedule"

    def validate(self) -> None:
        super().validate()
        if sum(v >= 0 for v in (self.at_step, self.at_tokens, self.at_flops)) != 1:
            raise ValueError("schedule trigger needs exactly one of at_step, at_tokens, at_flops")

    def wants_to_grow(self, step: int, tokens: int, flops: float) -> bool:
        if self.at_step >= 0:
            return step >= self.at_step
        if self.at_tokens >= 0:
            return tokens >= self.at_tokens
        return flops >= self.at_flops


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0


@dataclass
class PlateauTrigger(Trigger):
    """Grow when the loss stops improving. The training loss is smoothed by an exponential moving average
    (``ema``), and over the last ``window`` steps its least-squares slope against x = log(tokens) (``x='log-tokens'``:
    loss drop per e-fold of data, scale-free) or x = tokens / 1e6 (``x='tokens'``: loss drop per million tokens) is
    compared with ``threshold``: grow when the improvement -slope < threshold."""

    window: int = 50
    threshold: float = 0.05
    ema: float = 0.9
    x: str = "log-tokens"
    smoothed: float | None = None
    history: list = field(default_factory=list)  # [(x, smoothed loss)] of the last `window` steps

    kind = "plateau"

    def validate(self) -> None:
        super().validate()
        if self.window < 3 or not 0 <= self.ema < 1 or self.x not in ("log-tokens", "tokens"):
            raise ValueError(f"plateau trigger: need window >= 3, 0 <= ema < 1, x in ('log-tokens', 'tokens'); got "
                             f"window={self.window}, ema={self.ema}, x={self.x!r}")

    def observe(self, obs: Observation) -> None:
        self.smoothed = obs.loss if self.smoothed is None else self.ema * self.smoothed + (1 - self.ema) * obs.loss
        x = math.log(max(obs.tokens, 1)) if self.x == "log-tokens" else obs.tokens / 1e6
        self.history = (self.history + [(x, self.smoothed)])[-self.window:]

    def improvement(self) -> float | None:
        if len(self.history) < self.window:
            return None
        return -_slope([h[0] for h in self.history], [h[1] for h in self.history])

    def wants_to_grow(self, step: int, tokens: int, flops: float) -> bool:
        imp = self.improvement()
        return imp is not None and imp < self.threshold


@dataclass
class GradientTrigger(Trigger):
    """Gradient-noise surrogate. From the squared norms of one micro-batch's gradient (B_small tokens) and of the
    whole step's gradient (B_big tokens) it estimates, as McCandlish et al. (2018, appendix A) do, the squared norm
    of the true gradient |G|^2 and the trace of the per-token gradient covariance tr(S):

        |G|^2 = (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
        tr(S) = (|g_small|^2 - |g_big|^2) / (1 / B_small - 1 / B_big)

    both smoothed by EMAs. B_noise = tr(S) / |G|^2 is the "critical batch": when the batch in use is far below it,
    a step is mostly noise and the model is in the slow, noise-dominated phase of its own loss curve — the
    capacity-limited regime in which growing pays. It fires when B_big / B_noise < threshold. Needs
    ``train.grad_accum >= 2`` (two batch sizes from one step)."""

    threshold: float = 0.1
    ema: float = 0.95
    window: int = 20  # observations before the estimate is trusted
    g2: float | None = None
    s: float | None = None
    seen: int = 0
    last_ratio: float | None = None

    kind = "gradient"
    signals = frozenset({"gradient-noise"})

    def validate(self) -> None:
        super().validate()
        if self.threshold <= 0 or not 0 <= self.ema < 1:
            raise ValueError(f"gradient trigger: need threshold > 0 and 0 <= ema < 1, got {self.threshold}, {self.ema}")

    def observe(self, obs: Observation) -> None:
        if obs.grad_sq_small is None or obs.grad_sq_big is None or obs.tokens_big <= obs.tokens_small:
            return
        bs, bb = obs.tokens_small, obs.tokens_big
        g2 = (bb * obs.grad_sq_big - bs * obs.grad_sq_small) / (bb - bs)
        s = (obs.grad_sq_small - obs.grad_sq_big) / (1.0 / bs - 1.0 / bb)
        self.g2 = g2 if self.g2 is None else self.ema * self.g2 + (1 - self.ema) * g2
        self.s = s if self.s is None else self.ema * self.s + (1 - self.ema) * s
        self.seen += 1
        if self.g2 > 0 and self.s > 0:
            self.last_ratio = bb / (self.s / self.g2)

    def wants_to_grow(self, step: int, tokens: int, flops: float) -> bool:
        return self.seen >= self.window and self.last_ratio is not None and self.last_ratio < self.threshold


@dataclass
class ScalingLawTrigger(Trigger):
    """Grow when the current model's marginal gain per FLOP falls below the next shape's predicted one.

    Current: a power law L = a * C^(-b) is fitted (least squares in log-log) to the smoothed training loss against
    the FLOPs spent in this stage over the last ``window`` steps; its derivative gives -dL/dC now.
    Next: the size-dependent law L(N, D) = E + A / N^alpha + B / D^beta (defaults: Hoffmann et al. 2022, approach
    3; N non-embedding parameters, D tokens) gives the gain per FLOP of the next shape at the current token count,
    -dL/dC = B beta D^(-beta - 1) / (6 N_next) with C = 6 N D. Constants fitted on a user's own small runs
    should replace the defaults, which are calibrated on far larger models."""

    next_params: int = 0  # non-embedding parameters of the next shape (set by the trainer)
    window: int = 50
    ema: float = 0.9
    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28
    smoothed: float | None = None
    start_flops: float | None = None
    history: list = field(default_factory=list)  # [(stage flops, smoothed loss)]
    last: dict = field(default_factory=dict)

    kind = "scaling-law"

    def validate(self) -> None:
        super().validate()
        if self.window < 3 or self.beta <= 0 or self.B <= 0:
            raise ValueError("scaling-law trigger: need window >= 3, B > 0, beta > 0")

    def observe(self, obs: Observation) -> None:
        if self.start_flops is None:
            self.start_flops = obs.flops
        self.smoothed = obs.loss if self.smoothed is None else self.ema * self.smoothed + (1 - self.ema) * obs.loss
        c = obs.flops - self.start_flops
        if c > 0 and self.smoothed > 0:
            self.history = (self.history + [(c, self.smoothed)])[-self.window:]

    def current_gain(self) -> float | None:
        if len(self.history) < self.window:
            return None
        xs = [math.log(h[0]) for h in self.history]
        ys = [math.log(h[1]) for h in self.history]
        b = -_slope(xs, ys)
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        a = math.exp(my + b * mx)
        c = self.history[-1][0]
        return a * b * c ** (-b - 1)  # -dL/dC of L = a C^-b

    def next_gain(self, tokens: int) -> float:
        d = max(tokens, 1)
        return self.B * self.beta * d ** (-self.beta - 1) / (6.0 * max(self.next_params, 1))

    def wants_to_grow(self, step: int, tokens: int, flops: float) -> bool:
        now = self.current_gain()
        if now is None or not self.next_params:
            return False
        nxt = self.next_gain(tokens)
        self.last = {"current_gain_per_flop": now, "next_gain_per_flop": nxt}
        return now < nxt


@dataclass
class CurvatureTrigger(Trigger):
    """Curvature surrogate: how much of a step's first-order promise the curvature takes back.

    Every ``every`` steps the trainer re-evaluates the step's own batch after the update and reports the actual
    decrease L(theta) - L(theta + delta) and its first-order prediction -g . delta (g the unclipped gradient,
    delta the update the optimizer made). On a quadratic model their ratio is

        rho = 1 - kappa,    kappa = (delta^T H delta) / (2 g . (-delta)),

    kappa being the share of the linear gain that the curvature along the update direction cancels. A young
    model's steps are curvature-limited (kappa large: the optimizer is still descending sharp directions); as it
    trains, Adam's steps become nearly linear (kappa small): the model sits in a flat region where what each step
    gains is just the shrinking gradient signal. Measured on the Handbook's 4 x 64 model (WSD, lr 4e-3, probes
    every 5 steps): the smoothed kappa fell from about 0.2 in warm-up to 0.07 by step 230 and 0.04 by step 460.
    The trigger fires when the smoothed kappa stays below ``threshold`` after ``window`` probes: the small model
    has reached its flat, diminishing-returns phase, and growing adds the capacity it lacks.

    Cost: one forward pass of one step's batch per probe, counted in the run's FLOPs (a third of a step every
    ``every`` steps: 3% at every = 10). A Hessian-trace estimate (Hutchinson) would need Hessian-vector products,
    several backward passes per probe; this reads the curvature along the direction the optimizer moves."""

    threshold: float = 0.07
    every: int = 10
    ema: float = 0.8
    window: int = 5  # probes before the estimate is trusted
    kappa: float | None = None
    probes: int = 0
    last_kappa: float | None = None

    kind = "curvature"
    signals = frozenset({"step-probe"})

    def validate(self) -> None:
        super().validate()
        if self.every < 1 or self.window < 1 or not 0 <= self.ema < 1:
            raise ValueError(f"curvature trigger: need every >= 1, window >= 1, 0 <= ema < 1; got every={self.every}, "
                             f"window={self.window}, ema={self.ema}")

    def needs(self, step: int) -> frozenset[str]:
        """A probe every ``every`` steps of the stage: its last step of each ``every``."""
        return self.signals if (step - self.start_step) % self.every == self.every - 1 else frozenset()

    def observe(self, obs: Observation) -> None:
        if obs.decrease_actual is None or not obs.decrease_predicted or obs.decrease_predicted <= 0:
            return
        self.last_kappa = 1.0 - obs.decrease_actual / obs.decrease_predicted
        self.kappa = (self.last_kappa if self.kappa is None
                      else self.ema * self.kappa + (1 - self.ema) * self.last_kappa)
        self.probes += 1

    def wants_to_grow(self, step: int, tokens: int, flops: float) -> bool:
        return self.probes >= self.window and self.kappa is not None and self.kappa < self.threshold


TRIGGERS = {cls.kind: cls for cls in (ScheduleTrigger, PlateauTrigger, GradientTrigger, ScalingLawTrigger,
                                      CurvatureTrigger)}


def make_trigger(kind: str, **options) -> Trigger:
    """Build and validate a trigger; unknown kinds and options are errors that name them."""
    if kind not in TRIGGERS:
        raise ValueError(f"unknown trigger {kind!r}; known: {', '.join(TRIGGERS)}")
    cls = TRIGGERS[kind]
    names = {f.name for f in fields(cls)}
    for k in options:
        if k not in names:
            raise ValueError(f"unknown option {k!r} for trigger {kind!r}; valid: {', '.join(sorted(names))}")
    trig = cls(**options)
    trig.validate()
    return trig


def trigger_from_state(d: dict) -> Trigger:
    d = dict(d)
    cls = TRIGGERS[d.pop("kind")]
    if "history" in d:  # JSON made the (x, loss) pairs lists
        d["history"] = [tuple(h) for h in d["history"]]
    return cls(**d)
