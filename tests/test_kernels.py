"""Triton kernels against their torch references, under Triton's CPU interpreter.

Tolerance rule (flash-attention's): for every output and every gradient, the kernel's max error against an fp64
ground truth (the same reference code evaluated in fp64 on the same, already-rounded inputs) must be at most
K_RATIO = 2 times the max error of the torch reference run in the kernel's own precision, plus a floor of
FLOOR_ULPS = 8 fp32 ulps of the output's magnitude. The floor matters only where both errors are a few fp32 ulps
(fp32 runs; fp32 losses of bf16 runs): summing a row in another order legitimately moves a result by a few ulps,
while a real bug (wrong index, unmasked tail, mask ignored or applied twice, wrong sign in a backward) gives errors
of the order of the values themselves: 5e5 times the bound in fp32, 70 times in bf16 for a SwiGLU that ignores
its fade-in mask (``test_the_rule_rejects_a_kernel_that_ignores_the_fade_in_mask``).
Measured ratios kernel/torch error: 0.4-1.3 on most outputs and gradients, up to ~2 only where both errors are at
the fp32-ulp level (the floor's case; e.g. the fp32 cross-entropy gradient, 1.8e-8 vs 4.1e-9).

Shapes are odd on purpose (3 x 5 rows, widths 80 and 200, head_dim 96, vocab 200 in chunks of 128): every kernel
must mask the tail of its blocks, since widths change at each growth event. The interpreter costs ~1.4 ms per
program instance, hence tiny shapes and few training steps.
"""

import os
import subprocess
import sys

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # must be set before any @triton.jit function is defined

import pytest  # noqa: E402
import torch  # noqa: E402

from nanogrow import kernels as K  # noqa: E402
from nanogrow.kernels import reference as R  # noqa: E402
from nanogrow.model import ModelConfig, build_model, rope_tables  # noqa: E402

try:  # if the kernels were defined earlier without the interpreter, the tests fail saying so (no silent skip)
    TK, WHY_NOT = K.load_triton(), None
except ImportError as e:
    TK, WHY_NOT = None, f"triton is not importable ({e})"
finally:  # other test modules must not run their models through the interpreter ("auto" would pick it)
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

needs_triton = pytest.mark.skipif(WHY_NOT is not None, reason=f"Triton kernel tests skipped: {WHY_NOT}")

K_RATIO = 2.0
FLOOR_ULPS = 8
DTYPES = [torch.float32, torch.bfloat16]


def _rtne_convert_float(original):
    """Triton 3.7's interpreter converts fp32 -> bf16 by truncation where GPUs round to nearest even (the
    default of ``.to(tl.bfloat16)``); truncation doubles the bf16 rounding error and would make the tolerance
    rule measure the simulator, not the kernel. This makes the interpreter round like the hardware (torch's
    conversion is RTNE); ``test_interpreter_rounds_bf16_like_a_gpu`` checks it."""
    import numpy as np
    import triton.language as tl

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16)
            return t.view(torch.int16).numpy().view(np.uint16).reshape(np.shape(data))
        return original(data, src, dst, rounding_mode)
    return convert


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """This module's tests run with the interpreter on (Triton reads the variable at launch too; the variable
    is restored afterwards so that other modules' "auto" models stay on torch), rounding bf16 like a GPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if WHY_NOT is None:
        import triton.runtime.interpreter as interp
        monkeypatch.setattr(interp, "_convert_float", _rtne_convert_float(interp._convert_float))


# ----------------------------------------------------------------------------------------------------------
# The tolerance rule and a harness that checks outputs and gradients of one function
# ----------------------------------------------------------------------------------------------------------

def rule_violation(name, out, same_precision, truth) -> str | None:
    """None if out's error against truth is within K_RATIO x the same-precision reference's error + floor."""
    truth = truth.double()
    err_kernel = (out.double() - truth).abs().max().item()
    err_torch = (same_precision.double() - truth).abs().max().item()
    floor = FLOOR_ULPS * 2.0 ** -24 * truth.abs().max().item()
    if err_kernel <= K_RATIO * err_torch + floor:
        return None
    return (f"{name}: kernel error {err_kernel:.3g} > {K_RATIO} x torch error {err_torch:.3g} + floor {floor:.3g} "
            f"(ratio {err_kernel / max(err_torch, 1e-30):.2f})")


def run(fn, inputs, grads_of, seed=1):
    """Outputs of fn(*inputs) and the gradients of sum(out * g) (fixed random g) w.r.t. inputs[i], i in grads_of."""
    inputs = [x.detach().clone().requires_grad_(i in grads_of) if isinstance(x, torch.Tensor) else x
              for i, x in enumerate(inputs)]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [inputs[i] for i in grads_of])
    return [o.detach() for o in outs] + [g for g in grads]


def fp64(inputs):
    return [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]


def check(name, triton_fn, torch_fn, inputs, grads_of):
    """Kernel vs same-precision torch reference vs fp64 truth, for every output and gradient."""
    got = run(triton_fn, inputs, grads_of)
    same = run(torch_fn, inputs, grads_of)
    truth = run(torch_fn, fp64(inputs), grads_of)
    assert len(got) == len(same) == len(truth)
    for i, (a, b) in enumerate(zip(got, same)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name} result {i}: {a.dtype}{list(a.shape)} vs torch " \
                                                          f"{b.dtype}{list(b.shape)}"
    bad = [v for i, (a, b, t) in enumerate(zip(got, same, truth)) if (v := rule_violation(f"{name}[{i}]", a, b, t))]
    assert not bad, "; ".join(bad)
    return got, same, truth


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def fade_mask(n, seed=3):
    """A fade-in mask as MaskRamp makes it: 1 on old units, m in (0, 1) on the new ones (here the last third)."""
    m = torch.ones(n)
    m[2 * n // 3:] = 0.37
    return m


def scale_for(kind, n):
    return {"none": None, "channels": fade_mask(n), "block": torch.tensor(0.37),
            "both": fade_mask(n) * torch.tensor(0.6)}[kind]


T = lambda fn: (lambda *a: fn(*a, backend="triton"))  # noqa: E731
TORCH = lambda fn: (lambda *a: fn(*a, backend="torch"))  # noqa: E731


@needs_triton
def test_interpreter_rounds_bf16_like_a_gpu():
    """fp32 -> bf16 inside a kernel equals torch's round-to-nearest-even, ties and carries into the exponent
    included (the interpreter alone truncates: 1.00390625 would become 1.0 and 1.9999 would become 1.9921875)."""
    x = torch.cat([torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.9999, -2.4453125, 3.0e-39]), rand(200) * 3])
    got = TK.scaled_add(None, x[None], None, torch.bfloat16)[0]  # loads fp32, stores bf16
    assert got.dtype == torch.bfloat16 and torch.equal(got, x.to(torch.bfloat16))


# ----------------------------------------------------------------------------------------------------------
# Every kernel, forward and backward, fp32 and bf16, odd widths, with and without the growth masks
# ----------------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [80, 200])
def test_rms_norm_matches_reference(dtype, width):
    x, w = rand(3, 5, width, dtype=dtype), (1 + 0.3 * rand(width, seed=1)).to(dtype)
    check("rms_norm", lambda x, w: K.rms_norm(x, w, 1e-5, "triton"), lambda x, w: K.rms_norm(x, w, 1e-5, "torch"),
          [x, w], grads_of=(0, 1))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [80, 200])
@pytest.mark.parametrize("scale", ["none", "channels", "block", "both"])
def test_add_rms_norm_matches_reference_with_fade_in_scale(dtype, width, scale):
    """The attention branch's residual add (scaled by the fade-in masks) fused with the MLP's norm. h is fp32 as
    under autocast, the branch in the kernel's dtype."""
    h, br = rand(3, 5, width, seed=4), rand(3, 5, width, dtype=dtype, seed=5)
    w, s = (1 + 0.3 * rand(width, seed=6)).to(dtype), scale_for(scale, width)
    check("add_rms_norm", lambda h, b, w: K.add_rms_norm(h, b, s, w, 1e-5, "triton"),
          lambda h, b, w: K.add_rms_norm(h, b, s, w, 1e-5, "torch"), [h, br, w], grads_of=(0, 1, 2))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [80, 200])
@pytest.mark.parametrize("scale", ["none", "channels", "block", "both"])
def test_block_output_matches_reference_with_fade_in_scale(dtype, width, scale):
    h, br, s = rand(3, 5, width, dtype=dtype, seed=7), rand(3, 5, width, dtype=dtype, seed=8), scale_for(scale, width)
    check("residual_add", lambda h, b: K.residual_add(h, b, s, "triton"),
          lambda h, b: K.residual_add(h, b, s, "torch"), [h, br], grads_of=(0, 1))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [80, 200])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "unit_mask"])
def test_swiglu_matches_reference_with_unit_mask(dtype, width, masked):
    g, u = rand(3, 5, width, dtype=dtype, seed=9, scale=2.0), rand(3, 5, width, dtype=dtype, seed=10)
    m = fade_mask(width) if masked else None
    check("swiglu", lambda g, u: K.swiglu(g, u, m, "triton"), lambda g, u: K.swiglu(g, u, m, "torch"), [g, u],
          grads_of=(0, 1))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(3, 1), (4, 4)], ids=["gqa3-1", "mha4"])
def test_rope_matches_reference(dtype, heads):
    """head_dim 96: a half of 48 in a block of 64. Positions 0..4 of a longer table (a prefix, as the model uses)."""
    nq, nk = heads
    q, k = rand(3, 5, nq, 96, dtype=dtype, seed=11), rand(3, 5, nk, 96, dtype=dtype, seed=12)
    cos, sin = rope_tables(96, 9, 10000.0)
    cos, sin = cos[:5], sin[:5]
    check("rope", lambda q, k: K.rope(q, k, cos, sin, "triton"), lambda q, k: K.rope(q, k, cos, sin, "torch"),
          [q, k], grads_of=(0, 1))


def targets_with_ignored(n, v, seed=13):
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    t[[1, n // 2]] = -100  # ignored rows: no loss, no gradient, not counted in the mean
    return t


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [80, 200])
def test_cross_entropy_matches_reference(dtype, vocab):
    """vocab 200 is two chunks of 128 with a masked tail of 56; logits scaled so the softmax is not flat."""
    logits, t = rand(15, vocab, dtype=dtype, seed=14, scale=4.0), targets_with_ignored(15, vocab)
    check("cross_entropy", lambda x: K.cross_entropy(x, t, backend="triton"),
          lambda x: K.cross_entropy(x, t, backend="torch"), [logits], grads_of=(0,))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [80, 200])
def test_linear_cross_entropy_matches_reference(dtype, vocab):
    """The LM head fused with the loss, in chunks of rows (15 rows of width 48: 2 or 5 chunks)."""
    h, w = rand(15, 48, dtype=dtype, seed=15), rand(vocab, 48, dtype=dtype, seed=16, scale=0.3)
    t = targets_with_ignored(15, vocab)
    assert K.ops._chunk_rows(15, 48, vocab) < 15  # several chunks, or the chunking is not tested
    check("linear_cross_entropy", lambda h, w: K.linear_cross_entropy(h, w, t, backend="triton"),
          lambda h, w: K.linear_cross_entropy(h, w, t, backend="torch"), [h, w], grads_of=(0, 1))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_the_rule_rejects_a_kernel_that_ignores_the_fade_in_mask(dtype):
    """The tolerance has teeth: SwiGLU without its unit mask (a plausible fusion bug) fails it by far."""
    g, u, m = rand(3, 5, 80, dtype=dtype, seed=9, scale=2.0), rand(3, 5, 80, dtype=dtype, seed=10), fade_mask(80)
    got = K.swiglu(g, u, None, "triton")
    msg = rule_violation("swiglu", got, K.swiglu(g, u, m, "torch"), R.swiglu(g.double(), u.double(), m.double()))
    assert msg is not None and float(msg.rpartition("ratio ")[2].rstrip(")")) > 50, msg


@needs_triton
def test_custom_ops_pass_opcheck():
    """Schemas, fake (meta) implementations and autograd registrations agree with the real kernels: what
    torch.compile and FSDP2 rely on."""
    x, w = rand(4, 80), rand(80, seed=1)
    m = fade_mask(80)
    q, k = rand(1, 3, 2, 16, seed=2), rand(1, 3, 1, 16, seed=3)
    cos, sin = rope_tables(16, 3, 10000.0)
    logits, t = rand(4, 80, seed=4), targets_with_ignored(4, 80)
    cases = [
        (K.ops.rms_norm, (x, w, 1e-5)),
        (K.ops.add_rms_norm, (x, rand(4, 80, seed=5), m, w, 1e-5)),
        (K.ops.add_rms_norm, (x, rand(4, 80, seed=5), None, w, 1e-5)),
        (K.ops.scaled_add, (x, rand(4, 80, seed=6), m, torch.float32)),
        (K.ops.swiglu, (x, rand(4, 80, seed=7), m)),
        (K.ops.rope, (q, k, cos, sin, False)),
        (K.ops.cross_entropy, (logits, t, -100)),
        (K.ops.linear_cross_entropy, (rand(4, 16, seed=8), rand(80, 16, seed=9), t, -100, True)),
    ]
    for op, args in cases:
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.ndim > 0
                     and a is not m else a for a in args)
        torch.library.opcheck(op, args)


def tiny_model_with_fading_masks(kernels="triton"):
    from nanogrow.grow.fade import set_buffer

    cfg = ModelConfig(n_layer=2, d_model=48, n_head=3, n_kv_head=1, d_ff=72, vocab_size=97, max_seq_len=16,
                      kernels=kernels)
    model = build_model(cfg, seed=0)
    set_buffer(model, "resid_mask", fade_mask(48))
    set_buffer(model, "layers.1.mlp.unit_mask", fade_mask(72))
    set_buffer(model, "layers.1.block_mask", torch.tensor(0.3))
    gen = torch.Generator().manual_seed(0)
    return model, torch.randint(0, 97, (2, 12), generator=gen), torch.randint(0, 97, (2, 12), generator=gen)


def loss_and_grads(model, x, y, run=None):
    model.zero_grad()
    loss = (model if run is None else run)(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@needs_triton
def test_model_compiles_into_one_graph_with_the_kernel_ops():
    """fullgraph=True: the dispatch and the custom ops trace without a graph break (fake implementations and
    autograd formulas are used); compiled loss and gradients equal eager ones. aot_eager keeps the test fast:
    inductor (measured: same result, ~37 s here) would only add codegen around the opaque ops."""
    model, x, y = tiny_model_with_fading_masks()
    want, want_g = loss_and_grads(model, x, y)
    got, got_g = loss_and_grads(model, x, y, run=torch.compile(model, backend="aot_eager", fullgraph=True))
    assert torch.equal(got, want) and all(torch.equal(got_g[n], want_g[n]) for n in want_g)


@needs_triton
def test_model_under_fsdp2_matches_unsharded(tmp_path):
    """FSDP2 (fully_shard per block, then the root) on one gloo process: the ops see unsharded parameters."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    model, x, y = tiny_model_with_fading_masks()
    want, want_g = loss_and_grads(model, x, y)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for block in model.layers.values():
            fully_shard(block)
        fully_shard(model)
        got, got_g = loss_and_grads(model, x, y)
        got_g = {n: g.full_tensor() for n, g in got_g.items()}
    finally:
        dist.destroy_process_group()
    assert torch.equal(got, want) and all(torch.equal(got_g[n], want_g[n]) for n in want_g)


# ----------------------------------------------------------------------------------------------------------
# The model setting
# ----------------------------------------------------------------------------------------------------------

def test_kernels_setting_is_validated_with_the_key_and_allowed_values():
    with pytest.raises(ValueError, match=r"model\.kernels must be one of 'auto', 'triton', 'torch', got 'cuda'"):
        ModelConfig(kernels="cuda").validate()


def test_auto_is_torch_and_triton_fails_at_build_when_triton_cannot_run(monkeypatch):
    """Without CUDA and without the interpreter, "auto" builds a torch model and "triton" refuses at build."""
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = ModelConfig(n_layer=1, d_model=32, n_head=2, n_kv_head=2, vocab_size=64, max_seq_len=8)
    assert build_model(cfg).kernels == "torch"
    with pytest.raises(RuntimeError, match=r"model\.kernels='triton' but the Triton kernels cannot run.*CUDA"):
        build_model(ModelConfig(**{**cfg.__dict__, "kernels": "triton"}))


def test_without_triton_installed_the_model_imports_and_runs_on_torch():
    """Triton is optional: hide it from the import system in a fresh interpreter."""
    code = """
import sys
sys.modules["triton"] = None  # as if not installed
import torch
from nanogrow.model import ModelConfig, build_model
cfg = dict(n_layer=1, d_model=32, n_head=2, n_kv_head=2, vocab_size=64, max_seq_len=8)
for setting in ("auto", "torch"):
    m = build_model(ModelConfig(**cfg, kernels=setting))
    assert m.kernels == "torch", m.kernels
    loss = m(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    loss.backward()
try:
    build_model(ModelConfig(**cfg, kernels="triton"))
    raise SystemExit("no error")
except RuntimeError as e:
    print(e)
"""
    env = dict(os.environ, TRITON_INTERPRET="1")  # even with the interpreter asked for
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "model.kernels='triton'" in r.stdout and "triton is not installed" in r.stdout


# ----------------------------------------------------------------------------------------------------------
# Training: the tiny model with kernels="triton" tracks the torch run, across a growth with a masked fade-in
# ----------------------------------------------------------------------------------------------------------

def train_losses(kernels: str, dtype=torch.float32) -> list[float]:
    """8 steps of a tiny model (odd widths: d_model 48, d_ff 72, vocab 97): 2 steps, MSG growth to d_model 64,
    4 heads, d_ff 100 with a 3-step fade-in of the new units, channels and heads; 3 steps later a 2 -> 3 layer
    stack with a 2-step fade-in of the new block. The same batches for every run."""
    from nanogrow.grow import AdamW, grow, make_plan

    cfg = ModelConfig(n_layer=2, d_model=48, n_head=3, n_kv_head=1, d_ff=72, vocab_size=97, max_seq_len=16,
                      kernels=kernels)
    model = build_model(cfg, seed=0).to(dtype)  # initialised in fp32 (the same draws), then converted
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the fp64 truth: the grown models are built in fp64 too (fresh draws are
    try:  # made in fp32 by the plan, then cast, so every run gets the same new weights)
        opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        data = torch.randint(0, 97, (4, 2, 13), generator=gen)
        wide = ModelConfig(**{**cfg.__dict__, "d_model": 64, "n_head": 4, "d_ff": 100})
        deep = ModelConfig(**{**wide.__dict__, "n_layer": 3})
        events = {2: lambda c: make_plan("msg", c, wide, seed=1, fade_steps=3),
                  5: lambda c: make_plan("stack", c, deep, seed=2, fade_steps=2)}
        ramp, losses = None, []
        for step in range(8):
            if ramp is not None and ramp.apply(model, step):  # masks for this step; removed once the ramp ends
                ramp = None
            if step in events:
                plan = events[step](model.config)
                model, opt = grow(model, opt, plan)
                ramp = plan.mask_ramp(step)
                ramp.apply(model, step)
            batch = data[step % 4]
            loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert model.config.kernels == kernels and model.kernels == kernels
        return losses
    finally:
        torch.set_default_dtype(prev)


@needs_triton
def test_training_with_triton_kernels_tracks_torch_across_masked_growth():
    """Same rule as the kernels, on the losses of a short run: the Triton run's deviation from an fp64 run is at
    most K_RATIO x the fp32 torch run's deviation (plus the floor). Step by step, a fade-in mask applied wrongly
    (or not at all) changes the post-growth losses by ~1e-2, far outside it."""
    truth = train_losses("torch", torch.float64)
    ref = train_losses("torch")
    got = train_losses("triton")
    err_torch = max(abs(a - b) for a, b in zip(ref, truth))
    err_triton = max(abs(a - b) for a, b in zip(got, truth))
    floor = FLOOR_ULPS * 2.0 ** -24 * max(truth)
    print(f"losses fp64 {truth}\n  torch {ref}\n  triton {got}\n  err torch {err_torch:.3g} triton {err_triton:.3g}")
    assert truth[-1] < truth[0]  # it trains
    assert err_triton <= K_RATIO * err_torch + floor, (err_triton, err_torch, floor)


# ----------------------------------------------------------------------------------------------------------
# Benchmark entry point
# ----------------------------------------------------------------------------------------------------------

def test_bench_kernels_on_cpu_says_it_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lines = []
    assert K.bench_kernels(log=lines.append) == 0
    assert any("GPU" in line for line in lines)


@needs_triton
def test_bench_cases_run_on_both_backends_at_tiny_shapes():
    """The benchmark's cases and table, at interpreter-sized shapes (its GPU timings cannot be tested here)."""
    from nanogrow.kernels.bench import _measure_wallclock, llm_cases, run_cases

    lines = []
    cases = llm_cases("cpu", tokens=6, ce_tokens=5, d_models=(80,), vocabs=(200,), head_dim=16)
    rows = run_cases(cases, log=lines.append, measure=_measure_wallclock)
    assert {r["kernel"] for r in rows} == {"rms_norm", "add_rms_norm", "add_rms_norm+fade", "block_output+fade",
                                           "swiglu", "swiglu+unit_mask", "rope", "cross_entropy",
                                           "linear_cross_entropy"}
    assert len(lines) == len(rows) + 1 and all(r["triton_ms"] > 0 for r in rows)
