"""AdamW with per-element ages, and the transfer of optimizer state across a growth event.

``AdamW`` is bit-identical to ``torch.optim.AdamW`` when no growth happened, also when it tracks ages
(``ages=True``): such tensors are handed to torch's own foreach AdamW (``fused=True``: its fused one; foreach and
single-tensor give the same bits on CPU, the tests check both). The step is vectorised (``torch._foreach_*``):
tensors whose ages or lr scales are uniform but off torch's view take the same foreach ops (or fused kernel) with
their own step and lr; so do the boxes of a tensor with mixed ages or lr scales when a few boxes tile it uniformly
(a growth adds whole rows and columns), as views. Only other mixed tensors take the per-element path, whose bias
corrections are computed per distinct (age, lr scale) pair in fp64 and gathered (~1e-7 relative to the fp64
closed form). Whether a tensor is uniform, its boxes and its pairs are found once per state tensor version (one
sync), not every step.
Per-parameter state:

    step        0-d float32 tensor on CPU, as torch (steps this optimizer took for the tensor)
    exp_avg     first moment
    exp_avg_sq  second moment
    age         optional, float32 per element: steps this ELEMENT has been trained. Bias corrections use
                age + 1 at this step, so an element added at growth (age 0) takes a first step of about lr, as in
                a fresh Adam, not 1/(1 - beta1) ... times more (Variance-Transfer paper, appendix C: for Adam the
                stage-wise adaptation is a per-sub-network step count)
    lr_scale    optional, float32 per element: multiplier of the learning rate (and so of the decoupled weight
                decay); the stage-wise LR adaptation of the VT paper stores its per-sub-network factor here, and
                ``growth.new_lr_mult`` its multiplier of the new elements' learning rate.
    wd_scale    optional, float32 per element: multiplier of the weight decay alone (0 exempts an element);
                ``growth.new_wd_steps`` holds the new elements' decay off for a while after a growth, then the
                trainer drops this entry (``drop_wd_scales``).

Only tensors in the state, so ``torch.distributed.checkpoint`` can save and reshard it.

Transfer policies at growth (``transfer_optimizer_state``):
    reset    fresh optimizer state (what most public growth code does)
    map      moments mapped by the plan (exp_avg like the weights, exp_avg_sq with squared scales, fresh
             elements by the operator's state policy), one global step count
    map+age  as map, plus per-element ages: gathered elements keep theirs, fresh ones start at 0
"""

from __future__ import annotations

import itertools
import math
import re
from typing import TYPE_CHECKING

import torch
from torch.optim.adam import adam as torch_adam

from nanogrow.grow.execute import apply_to_model, check_model
from nanogrow.grow.lr import new_elements, stagewise_lr_scales

if TYPE_CHECKING:
    from nanogrow.grow.plan import GrowthPlan

POLICIES = ("reset", "map", "map+age")


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, ages: bool = False, fused: bool = False):
        """``ages=True`` tracks per-element ages from the first step (otherwise only states mapped by a growth
        with policy map+age carry them). ``fused=True`` hands the tensors without ages or lr scales to torch's
        fused AdamW (``torch.optim.AdamW(fused=True)``'s update) instead of its foreach one."""
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        self.track_ages, self.fused = ages, fused
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def fresh_state(self, p: torch.Tensor) -> dict:
        state = {"step": torch.tensor(0.0, dtype=torch.float32),
                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        if self.track_ages:
            state["age"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    def init_state(self) -> None:
        """Create the state of every parameter that has none, exactly as a first step would (step 0, zero
        moments). Checkpointing calls this: DCP would otherwise create it by stepping once with zero gradients
        (``_init_optim_state``), leaving step=1 and bias-correcting the first real update as the second."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self.state[p] = self.fresh_state(p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        """One update of a param group, vectorised with ``torch._foreach_*`` ops. Each tensor takes one of four
        routes, decided by the cached uniformity of its ages and lr scales (no sync per step):

        torch      no ages (or uniform ages equal to its step count) and lr scale 1: handed to torch's own
                   foreach (or, with ``fused=True``, fused) Adam, so the update is torch's, bit for bit;
        scalar     uniform ages that differ from the step count, or one lr scale for the whole tensor: torch's
                   ops (or fused kernel) with a step and lr per tensor (``_own_step_update``), bit for bit;
        blocks     mixed ages or lr scales that tile the tensor in a few uniform boxes (whole rows and columns
                   added by a growth): each box, as a view, takes the scalar route with its own step and lr;
        element    other mixed ages or lr scales: bias corrections per distinct (age, lr scale) pair, computed
                   in fp64 for a handful of values and gathered per element (``_element_update``).
        """
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        torch_route: tuple[list, ...] = ([], [], [], [], [])  # params, grads, exp_avgs, exp_avg_sqs, steps
        scalar_route: tuple[list, ...] = ([], [], [], [], [])  # params, grads, exp_avgs, exp_avg_sqs, (step, lr)
        block_route: tuple[list, ...] = ([], [], [], [], [])  # the same, of views
        element_route = []
        ages, own_steps = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state.update(self.fresh_state(p))
            age, lr_scale = state.get("age"), state.get("lr_scale")
            uniform_age = self._uniform(p, "age", age)
            uniform_scale = self._uniform(p, "lr_scale", lr_scale)
            if age is not None:
                ages.append((p, age, uniform_age))
            tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])
            scale_ok = lr_scale is None or uniform_scale is not None
            if "wd_scale" in state and wd != 0:  # decay held off some elements (growth.new_wd_steps): short-lived
                element_route.append((p, state, uniform_age, uniform_scale, True))
            elif scale_ok and (age is None or uniform_age is not None):
                if uniform_scale in (None, 1.0) and (age is None or uniform_age == float(state["step"])):
                    for lst, t in zip(torch_route, tensors):
                        lst.append(t)
                    continue
                step_now = float(state["step"]) + 1 if age is None else uniform_age + 1
                lr_p = lr if uniform_scale in (None, 1.0) else lr * uniform_scale
                for lst, t in zip(scalar_route, tensors[:4] + ((step_now, lr_p),)):
                    lst.append(t)
            else:
                layout = self._layout(p, age, lr_scale)
                if layout is not None and layout[0] == "blocks":
                    grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
                    for index, block_age, block_scale in layout[1]:
                        step_now = (float(state["step"]) if block_age is None else block_age) + 1
                        views = (p[index], grad[index], exp_avg[index], exp_avg_sq[index])
                        for lst, t in zip(block_route, views + ((step_now, lr * block_scale),)):
                            lst.append(t)
                else:
                    element_route.append((p, state, uniform_age, uniform_scale, False))
            own_steps.append(state["step"])
        if own_steps:
            torch._foreach_add_(own_steps, 1)
        if ages:
            torch._foreach_add_([a for _, a, _ in ages], 1)
            for p, a, value in ages:
                self._bump(p, a, value)
        if torch_route[0]:
            params, grads, exp_avgs, exp_avg_sqs, steps = torch_route
            fused = getattr(self, "fused", False)  # (absent after a pickle round trip, as track_ages)
            torch_adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=not fused, fused=fused,
                       decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd,
                       eps=eps, maximize=False)
        if scalar_route[0]:
            self._own_step_update(*scalar_route, beta1, beta2, eps, wd, fold=False)
        if block_route[0]:
            self._own_step_update(*block_route, beta1, beta2, eps, wd, fold=True)
        for p, state, uniform_age, uniform_scale, direct in element_route:
            update = _element_update_direct if direct else self._element_update
            update(p, state, uniform_age, uniform_scale, lr, beta1, beta2, eps, wd)

    def _element_update(self, p, state, uniform_age, uniform_scale, lr, beta1, beta2, eps, wd) -> None:
        """AdamW on a tensor whose elements have different ages or lr scales (ages already advanced):

            p <- p * (1 - lr s wd) - lr s m / (bc1 (sqrt(v) / sqrt(bc2) + eps))
              =  p * (1 - lr s wd) - lr m / (sqrt(v) A + C),   A = bc1 / (s sqrt(bc2)),  C = bc1 eps / s

        with bc = 1 - beta**age per element. A tensor's elements take few distinct (age, s) pairs (one per growth
        event that touched it), so A and C are computed per pair in fp64 and gathered per element: two passes
        instead of a dozen over the tensor. The pairs and each element's pair index are found once per state
        version (``_layout``); an element with s = 0 gets A = 0, C = inf, so it does not move (but decays)."""
        age, lr_scale = state.get("age"), state.get("lr_scale")
        grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
        layout = self._layout(p, age, lr_scale)
        if layout is None:  # too many distinct pairs: per-element bias corrections from the ages
            return _element_update_direct(p, state, uniform_age, uniform_scale, lr, beta1, beta2, eps, wd)
        age_k, scale_k, index = layout[1]
        if age_k is None:  # lr scales differ, ages do not: the step count is every element's age
            age_k = torch.full_like(scale_k, float(state["step"]))
        bc1 = -torch.expm1(age_k * math.log(beta1)) if beta1 > 0 else torch.ones_like(age_k)
        bc2 = -torch.expm1(age_k * math.log(beta2)) if beta2 > 0 else torch.ones_like(age_k)
        zero = scale_k == 0
        safe = torch.where(zero, torch.ones_like(scale_k), scale_k)
        a_k = torch.where(zero, torch.zeros_like(bc1), bc1 / (safe * bc2.sqrt()))
        c_k = torch.where(zero, torch.full_like(bc1, math.inf), bc1 * eps / safe)
        dt, shape = exp_avg_sq.dtype, p.shape
        buf_a, buf_c, buf_d = self._scratch(p.numel(), dt, p.device)
        a, c, d = buf_a.view(shape), buf_c.view(shape), buf_d.view(shape)
        if wd != 0:
            if uniform_scale is not None or lr_scale is None:
                p.mul_(1 - lr * (1.0 if uniform_scale is None else uniform_scale) * wd)
            else:
                p.mul_(torch.index_select((1 - lr * scale_k * wd).to(dt), 0, index, out=buf_a).view(shape))
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        torch.index_select(a_k.to(dt), 0, index, out=buf_a)
        torch.index_select(c_k.to(dt), 0, index, out=buf_c)
        torch.sqrt(exp_avg_sq, out=d)
        p.addcdiv_(exp_avg, c.addcmul_(d, a), value=-lr)

    def _scratch(self, n: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
        """Three flat work buffers of at least ``n`` elements, kept between steps and shared by all tensors: a
        fresh temporary per tensor and step costs more (page faults) than the arithmetic on CPU."""
        key = (dtype, torch.device(device))
        pool = self.__dict__.setdefault("_scratch_pool", {})
        bufs = pool.get(key)
        if bufs is None or bufs[0].numel() < n:
            bufs = pool[key] = tuple(torch.empty(n, dtype=dtype, device=device) for _ in range(3))
        return tuple(b[:n] for b in bufs)

    def _own_step_update(self, params, grads, exp_avgs, exp_avg_sqs, step_lr, beta1, beta2, eps, wd,
                         fold: bool) -> None:
        """AdamW on tensors (or uniform boxes of them, as views) that each have their own (step, lr). With
        ``fused=True``, the contiguous plain CPU ones take torch's fused kernel, one call per lr, with the step
        counts as tensors (so a tensor's update is ``torch.optim.AdamW(fused=True)``'s at that step, bit for bit;
        the kernel ignores strides, hence contiguous only). The others take the ops of torch's multi-tensor Adam
        (``torch.optim.adam._multi_tensor_adam``, decoupled weight decay, steps on the host), operation for
        operation. ``fold`` (boxes of tensors with mixed ages, which need not match torch's bits) folds the
        second moment's bias correction into eps and the step size, one pass fewer, the same update to rounding:

            p <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)
               = p - (lr sqrt(bc2) / bc1) m / (sqrt(v) + eps sqrt(bc2))
        """
        rest: tuple[list, ...] = ([], [], [], [], [])
        by_lr: dict[float, tuple[list, ...]] = {}
        for item in zip(params, grads, exp_avgs, exp_avg_sqs, step_lr):
            fused = getattr(self, "fused", False) and all(
                type(t) is torch.Tensor and t.device.type == "cpu" and t.is_contiguous() for t in item[:4])
            lists = by_lr.setdefault(item[4][1], ([], [], [], [], [])) if fused else rest
            for lst, t in zip(lists, item):
                lst.append(t)
        for lr, (ps, gs, ms, vs, steps) in by_lr.items():
            torch._fused_adamw_(ps, gs, ms, vs, [], [torch.tensor(float(step)) for step, _ in steps], lr=lr,
                                beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
        params, grads, exp_avgs, exp_avg_sqs, step_lr = rest
        if not params:
            return
        if wd != 0:
            torch._foreach_mul_(params, [1 - lr * wd for _, lr in step_lr])
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        step_size = [(lr / (1 - beta1 ** step)) * -1 for step, lr in step_lr]
        bias_correction2_sqrt = [(1 - beta2 ** step) ** 0.5 for step, _ in step_lr]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        if fold:
            torch._foreach_add_(denom, [eps * bc2 for bc2 in bias_correction2_sqrt])
            step_size = [size * bc2 for size, bc2 in zip(step_size, bias_correction2_sqrt)]
        else:
            torch._foreach_div_(denom, bias_correction2_sqrt)
            torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)

    _MAX_BLOCKS = 32
    _MAX_CLASSES = 256

    def _layout(self, p, age, lr_scale):
        """How a tensor with mixed ages or lr scales is updated, found once per state version and cached by
        tensor identity and version (``_bump`` advances the cached ages with the tensor's):

        ("blocks", [(index, age, lr scale)])  the tensor cut into at most _MAX_BLOCKS boxes, each uniform (a growth
                       adds whole rows and columns, so its ages form a few boxes; age None: the step count);
        ("pairs", (ages [k] fp64 or None, lr scales [k] fp64, pair index per element int32))  its distinct
                       (age, lr scale) pairs, at most _MAX_CLASSES (without ages, the pairs are the lr scales');
        None           neither, or not a plain tensor (a DTensor shard): the direct per-element route."""
        if type(p.data) is not torch.Tensor:
            return None
        cache = self.__dict__.setdefault("_layout_cache", {})
        key = _versions(age, lr_scale)
        hit = cache.get(id(p))
        if hit is not None and _same(hit[0], key):
            return hit[1]
        blocks = _uniform_blocks(age, lr_scale, self._MAX_BLOCKS)
        value = ("blocks", blocks) if blocks is not None else _pairs(age, lr_scale, self._MAX_CLASSES)
        cache[id(p)] = (key, value)
        return value

    # A tensor's ages stay uniform (or not) as all its elements age together, so whether they are is checked once
    # per tensor (one device sync), then cached by tensor identity and version: any outside in-place change or
    # replacement (load_state_dict, a growth) bumps the version and triggers a new check.
    def _uniform(self, p: torch.Tensor, key: str, t: torch.Tensor | None) -> float | None:
        """The common value of all elements of state tensor ``t`` of parameter ``p``, or None if they differ (or
        t is None)."""
        if t is None:
            return None
        cache = self.__dict__.setdefault("_uniform_cache", {})  # (id(param), key) -> (tensor, version, value)
        hit = cache.get((id(p), key))
        if hit is not None and hit[0] is t and hit[1] == t._version:
            return hit[2]
        lo, hi = torch.aminmax(t)
        value = float(lo) if bool(lo == hi) else None
        cache[(id(p), key)] = (t, t._version, value)
        return value

    def forget_uniform_cache(self) -> None:
        """Call after writing state tensors by means that do not bump their version (collectives such as
        ``dist.broadcast`` write the storage directly): the next step re-checks which ages are uniform."""
        self.__dict__.pop("_uniform_cache", None)
        self.__dict__.pop("_layout_cache", None)

    def _bump(self, p: torch.Tensor, age: torch.Tensor, value: float | None) -> None:
        """Record that ``age`` (of parameter ``p``) was just advanced by one step, by this optimizer."""
        self._uniform_cache[(id(p), "age")] = (age, age._version, None if value is None else value + 1)
        layout = self.__dict__.get("_layout_cache", {}).get(id(p))
        if layout is not None:
            (a, version, s, s_version), value = layout
            if a is age and version == age._version - 1:
                if value is not None and value[0] == "blocks":
                    value = ("blocks", [(index, block_age + 1, scale) for index, block_age, scale in value[1]])
                elif value is not None:
                    age_k, scale_k, inverse = value[1]
                    value = ("pairs", (age_k + 1, scale_k, inverse))
                self._layout_cache[id(p)] = ((a, age._version, s, s_version), value)

    def load_state_dict(self, state_dict):
        # torch casts every floating state tensor but "step" to the parameter's dtype; ages and lr/wd scales stay
        # float32 (a bf16 age stops counting at 256).
        keep = {pid: {k: v.clone() for k, v in st.items() if k in ("age", "lr_scale", "wd_scale")}
                for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        for saved, p in zip(saved_ids, [p for g in self.param_groups for p in g["params"]]):
            for k, v in keep.get(saved, {}).items():
                self.state[p][k] = v.to(device=p.device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# State transfer
# ----------------------------------------------------------------------------------------------------------

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings, none on norm gains (the usual GPT/Llama practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, t, ages: bool = False, fused: bool | None = None) -> AdamW:
    """nanogrow's AdamW for ``model`` with the hyper-parameters of TrainConfig ``t``: torch's AdamW update, plus
    per-element ages once a growth has mapped the state. ``fused=None``: torch's fused update for plain CPU
    tensors (about 5x faster than foreach there, measured: it makes one pass and no temporaries), its foreach
    update elsewhere (DTensor shards; CUDA, where fused would need the step counts on the device)."""
    if fused is None:
        fused = all(type(p.data) is torch.Tensor and p.device.type == "cpu" for p in model.parameters())
    return AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, ages=ages,
                 fused=fused)


def _versions(age, lr_scale) -> tuple:
    return (age, None if age is None else age._version, lr_scale, None if lr_scale is None else lr_scale._version)


def _same(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] == b[1] and a[2] is b[2] and a[3] == b[3]


def _uniform_blocks(age, lr_scale, max_blocks: int) -> list | None:
    """[(index, age or None, lr scale)] of the boxes that tile the tensor with uniform (age, lr scale), or None if
    that takes more than ``max_blocks``. Along each dimension, the tensor is cut wherever any element differs from
    its neighbour along that dimension; within the grid of cuts every box is then uniform (moving along any
    dimension inside it crosses no change)."""
    values = [t for t in (age, lr_scale) if t is not None]
    shape = values[0].shape
    spans = []
    for d, n in enumerate(shape):
        change = torch.zeros(max(n - 1, 0), dtype=torch.bool, device=values[0].device)
        for t in values:
            differs = t.narrow(d, 1, n - 1) != t.narrow(d, 0, n - 1)
            change |= differs.movedim(d, 0).reshape(n - 1, -1).any(dim=1)
        bounds = [0] + (torch.nonzero(change).view(-1) + 1).tolist() + [n]
        spans.append(list(zip(bounds[:-1], bounds[1:])))
    if math.prod(len(s) for s in spans) > max_blocks:
        return None
    blocks = []
    for box in itertools.product(*spans):
        corner = tuple(lo for lo, _ in box)
        blocks.append((tuple(slice(lo, hi) for lo, hi in box),
                       None if age is None else float(age[corner]),
                       1.0 if lr_scale is None else float(lr_scale[corner])))
    return blocks


def _pairs(age, lr_scale, max_pairs: int) -> tuple | None:
    """("pairs", (ages [k] fp64 or None, lr scales [k] fp64, pair index per element int32)), or None if there are
    more than ``max_pairs`` distinct (age, lr scale) pairs."""
    s = lr_scale.reshape(-1).double() if lr_scale is not None else None
    if age is None:
        scale_k, inverse = torch.unique(s, return_inverse=True)
        age_k = None
    elif s is None:
        age_k, inverse = torch.unique(age.reshape(-1).double(), return_inverse=True)
        scale_k = torch.ones_like(age_k)
    else:
        pairs, inverse = torch.unique(torch.stack([age.reshape(-1).double(), s]), dim=1, return_inverse=True)
        age_k, scale_k = pairs[0].contiguous(), pairs[1].contiguous()
    return None if scale_k.numel() > max_pairs else ("pairs", (age_k, scale_k, inverse.to(torch.int32)))


def _element_update_direct(p, state, uniform_age, uniform_scale, lr, beta1, beta2, eps, wd) -> None:
    """The per-element update with bias corrections computed from every element's age (fp32, by expm1): for
    tensors with too many distinct (age, lr scale) pairs, for DTensor shards, and for tensors whose weight decay
    is scaled per element (``wd_scale``)."""
    grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
    age, lr_scale, wd_scale = state.get("age"), state.get("lr_scale"), state.get("wd_scale")
    if uniform_scale is not None:
        lr, lr_scale = lr * uniform_scale, None
    lr_t = lr if lr_scale is None else lr_scale * lr
    if wd != 0:
        p.mul_(1 - lr_t * wd if wd_scale is None else 1 - lr_t * wd * wd_scale)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if age is not None and uniform_age is None:
        # 1 - beta**age as -expm1(age * log(beta)): fp32, accurate to ~1e-7 relative even for age 1
        # and beta2 = 0.999 (no fp64, which is slow on most GPUs).
        step_size = lr_t / _one_minus_pow(beta1, age)
        bc2_sqrt = _one_minus_pow(beta2, age).sqrt_()
    else:
        step = float(state["step"]) if age is None else uniform_age + 1
        step_size = lr_t / (1 - beta1 ** step)
        bc2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    if isinstance(step_size, torch.Tensor):
        # addcdiv computes p + (value * m) / denom; the same order as torch's scalar path.
        p.addcdiv_(exp_avg * step_size.to(p.dtype).neg_(), denom)
    else:
        p.addcdiv_(exp_avg, denom, value=-step_size)


def _one_minus_pow(beta: float, age: torch.Tensor) -> torch.Tensor:
    if beta == 0.0:
        return torch.ones_like(age)
    return torch.expm1(age * math.log(beta)).neg_()


def missing_state(kind: str, p: torch.Tensor, state: dict, shape=None, device=None) -> torch.Tensor:
    """What an optimizer state of ``kind`` that ``state`` (of parameter ``p``) does not hold means: zero moments,
    every element aged the step count, lr scale 1. ``shape``/``device``: of the tensor to build (default ``p``'s;
    a sharded reader builds a full tensor)."""
    shape = p.shape if shape is None else shape
    device = p.device if device is None else device
    if kind in ("exp_avg", "exp_avg_sq"):
        return torch.zeros(shape, dtype=p.dtype, device=device)
    if kind == "age":
        return torch.full(shape, float(state["step"]) if "step" in state else 0.0, dtype=torch.float32, device=device)
    if kind == "lr_scale":
        return torch.ones(shape, dtype=torch.float32, device=device)
    raise ValueError(kind)


def _state_reader(old_model, old_opt, kind: str):
    params = dict(old_model.named_parameters())

    def read(name: str) -> torch.Tensor:
        p = params[name]
        st = old_opt.state.get(p, {}) if old_opt is not None else {}
        return st[kind] if kind in st else missing_state(kind, p, st)
    return read


def global_step(opt) -> float:
    """The largest per-tensor step count of an optimizer (0 without state)."""
    steps = [float(st["step"]) for st in opt.state.values() if "step" in st] if opt is not None else []
    return max(steps, default=0.0)


def transfer_optimizer_state(plan: GrowthPlan, old_model, old_opt, new_model, new_opt, policy: str = "map+age",
                             lr_adapt: str | None = None, new_lr_mult: float = 1.0,
                             new_wd_hold: bool = False) -> None:
    """Fill ``new_opt``'s state for ``new_model``'s parameters from ``old_opt`` (torch or nanogrow AdamW) through
    ``plan``, one parameter at a time. Param groups and hyper-parameters are the caller's (``grow`` copies them).
    ``lr_adapt='vt'``: also store the Variance-Transfer stage-wise LR factor as per-element ``lr_scale``.
    ``new_lr_mult``: the new elements' (``new_elements``) lr scale times this factor; ``new_wd_hold``: a
    ``wd_scale`` of 0 on the new elements (no weight decay until ``drop_wd_scales``)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown optimizer transfer policy {policy!r}; known: {', '.join(POLICIES)}")
    if lr_adapt not in (None, "vt"):
        raise ValueError(f"lr_adapt must be None or 'vt', got {lr_adapt!r}")
    if not (isinstance(new_lr_mult, (int, float)) and math.isfinite(new_lr_mult) and new_lr_mult > 0):
        raise ValueError(f"new_lr_mult must be a positive number, got {new_lr_mult!r}")
    if policy == "reset":
        if lr_adapt is not None or new_lr_mult != 1.0 or new_wd_hold:
            raise ValueError("lr_adapt, new_lr_mult and new_wd_steps need mapped optimizer state (per-element "
                             "scales); they cannot be combined with policy='reset'")
        return
    step = global_step(old_opt)
    readers = {k: _state_reader(old_model, old_opt, k) for k in ("exp_avg", "exp_avg_sq", "age", "lr_scale")}
    vt_scales = {}
    if lr_adapt == "vt":
        vt_scales = stagewise_lr_scales(plan, new_model, readers["lr_scale"])
    new = new_elements(plan) if new_lr_mult != 1.0 or new_wd_hold else {}
    for name, p in new_model.named_parameters():
        pp = plan.targets[name]
        st = {"step": torch.tensor(step, dtype=torch.float32)}
        for k in ("exp_avg", "exp_avg_sq"):
            st[k] = pp.materialize(readers[k], k, device=p.device, dtype=p.dtype)
        if policy == "map+age":
            age = pp.materialize(readers["age"], "age", device=p.device, dtype=torch.float32)
            if not bool((age == step).all()):  # uniform ages: keep the fast scalar path
                st["age"] = age
        lr_scale = vt_scales.get(name)
        if lr_scale is None:
            lr_scale = pp.materialize(readers["lr_scale"], "lr_scale", device=p.device, dtype=torch.float32)
        fresh = new.get(name)
        if fresh is not None:
            fresh = fresh.to(p.device)
            if new_lr_mult != 1.0:
                lr_scale = torch.where(fresh, lr_scale * new_lr_mult, lr_scale)
            if new_wd_hold:
                st["wd_scale"] = (~fresh).float()
        if not bool((lr_scale == 1).all()):
            st["lr_scale"] = lr_scale
        new_opt.state[p] = st


def drop_wd_scales(opt) -> int:
    """End the weight-decay hold of ``growth.new_wd_steps``: every element decays again. Returns how many
    tensors had one."""
    n = 0
    for st in opt.state.values():
        n += st.pop("wd_scale", None) is not None
    return n


def group_key(name: str) -> str:
    return re.sub(r"^layers\.\d+\.", "layers.*.", name)


def grown_groups(plan: GrowthPlan, old_groups: dict[str, int]) -> dict[str, int]:
    """The old param group (index) each target of ``plan`` joins, from the old parameters' ``old_groups``
    (name -> index): its primary source's, else that of the same parameter in another layer, else group 0.
    The one rule for every executor (one process, FSDP2, ZeRO)."""
    key_group: dict[str, int] = {}
    for n, gi in old_groups.items():
        key_group.setdefault(group_key(n), gi)
    out = {}
    for name, pp in plan.targets.items():
        gi = old_groups.get(pp.primary_source) if pp.primary_source is not None else None
        out[name] = key_group.get(group_key(name), 0) if gi is None else gi
    return out


def grown_optimizer(model, optimizer, plan: GrowthPlan, new_model) -> "AdamW":
    """A nanogrow AdamW over ``new_model``'s parameters with the old param groups' hyper-parameters (no state yet),
    each target in the group ``grown_groups`` gives. Shared by one-process and sharded growth."""
    old_names = {p: n for n, p in model.named_parameters()}
    old_groups = {old_names[p]: gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]
                  if p in old_names}
    joins = grown_groups(plan, old_groups)
    groups = [dict({k: v for k, v in g.items() if k != "params"}, params=[]) for g in optimizer.param_groups]
    for name, p in new_model.named_parameters():
        groups[joins[name]]["params"].append(p)
    groups = [g for g in groups if g["params"]]
    track = getattr(optimizer, "track_ages", False)
    defaults = optimizer.defaults
    new_opt = AdamW(groups, lr=defaults.get("lr", 1e-3), betas=defaults.get("betas", (0.9, 0.999)),
                    eps=defaults.get("eps", 1e-8), weight_decay=defaults.get("weight_decay", 1e-2), ages=track,
                    fused=getattr(optimizer, "fused", False) and all(type(p.data) is torch.Tensor
                                                                     for p in new_model.parameters()))
    return new_opt


def grow(model, optimizer, plan: GrowthPlan, policy: str = "map+age", device=None, lr_adapt: str | None = None,
         new_lr_mult: float = 1.0, new_wd_hold: bool = False):
    """One-process growth: the grown model (built on meta, ``to_empty``, filled by the plan, masks set) and a
    new nanogrow ``AdamW`` with the old param groups' hyper-parameters, its state transferred by ``policy``.
    Everything is validated before anything is built; the old model and optimizer are left untouched.
    ``optimizer=None`` returns (new_model, None). Keep ``plan.mask_ramp(step)`` to drive fade-in masks."""
    if policy not in POLICIES:
        raise ValueError(f"unknown optimizer transfer policy {policy!r}; known: {', '.join(POLICIES)}")
    check_model(plan, model)
    if optimizer is not None:
        for g in optimizer.param_groups:
            if g.get("amsgrad") or g.get("maximize"):
                raise ValueError("grow: amsgrad / maximize param groups are not supported by nanogrow AdamW")
    new_model = apply_to_model(plan, model, device=device)
    if optimizer is None:
        return new_model, None
    new_opt = grown_optimizer(model, optimizer, plan, new_model)
    transfer_optimizer_state(plan, model, optimizer, new_model, new_opt, policy=policy, lr_adapt=lr_adapt,
                             new_lr_mult=new_lr_mult, new_wd_hold=new_wd_hold)
    return new_model, new_opt
