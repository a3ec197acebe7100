"""Helpers for growth tests (here and in the trainer's / sharded-growth tests): tiny seeded models trained a few
steps on random tokens, so weights and Adam moments are non-trivial before a growth; and ``check_plan``, the full
consistency check of a GrowthPlan that the operator tests make."""

from __future__ import annotations

from dataclasses import replace

import torch

from nanogrow.grow.optim import AdamW
from nanogrow.grow.plan import GrowthPlan, ParamPlan, piece_block_shape, write_piece
from nanogrow.grow.schema import mask_shapes, param_shapes
from nanogrow.model import ModelConfig, build_model


def tiny_config(gqa: bool = True, tied: bool = False, **overrides) -> ModelConfig:
    """2 layers, d_model 32, 4 query heads (2 kv heads with GQA, else 4), d_ff 64, vocab 64. init_std 0.05 keeps
    logits O(1), so a 1e-5 tolerance on them is a real test."""
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=4, n_kv_head=2 if gqa else 4, d_ff=64, vocab_size=64,
                      max_seq_len=32, tie_embeddings=tied, init_std=0.05)
    return replace(cfg, **overrides)


def batch(cfg: ModelConfig, seed: int, batch_size: int = 2, seq: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch_size, seq + 1), generator=g)


def train_steps(model, opt, steps: int, seed: int = 0, ramp=None, start_step: int = 0) -> list[float]:
    """``steps`` optimizer steps on random tokens; returns the losses. ``ramp``: a MaskRamp applied each step."""
    losses = []
    for s in range(steps):
        if ramp is not None:
            ramp.apply(model, start_step + s)
        x = batch(model.config, seed * 1000 + s)
        loss = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def trained_model(cfg: ModelConfig, steps: int = 3, lr: float = 1e-2, ages: bool = False, seed: int = 0,
                  opt_cls=None):
    """A seeded tiny model and its AdamW (nanogrow's unless ``opt_cls``) after ``steps`` steps."""

    model = build_model(cfg, seed=seed)
    if opt_cls is None:
        opt = AdamW(model.parameters(), lr=lr, weight_decay=0.1, ages=ages)
    else:
        opt = opt_cls(model.parameters(), lr=lr, weight_decay=0.1)
    train_steps(model, opt, steps, seed=seed)
    return model, opt


@torch.no_grad()
def logits(model, seed: int = 123) -> torch.Tensor:
    x = batch(model.config, seed)
    return model(x[:, :-1].contiguous())


class one_thread:
    """Context manager: torch on one intra-op thread. Tiny models gain nothing from threads, and on a shared
    2-core machine two spinning threads per process make a 10 ms step take seconds."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def check_plan(plan: GrowthPlan) -> None:
    """Full consistency check: targets match the new model's parameters, every element is covered exactly once,
    sources exist in the old model, masks have the right shapes. Raises AssertionError."""
    new_shapes, old_shapes = param_shapes(plan.new_cfg), param_shapes(plan.old_cfg)
    if list(plan.targets) != list(new_shapes):
        raise AssertionError(f"plan targets {sorted(set(plan.targets) ^ set(new_shapes))} differ from the model")
    for name, pp in plan.targets.items():
        if tuple(pp.shape) != tuple(new_shapes[name]):
            raise AssertionError(f"{name}: plan shape {pp.shape} != model {new_shapes[name]}")
        for s in pp.sources:
            if s not in old_shapes:
                raise AssertionError(f"{name} reads unknown old parameter {s}")
        check_param_plan(pp, old_shapes)
    ms = mask_shapes(plan.new_cfg)
    for name, m in plan.masks.items():
        if name not in ms or tuple(m.shape) != ms[name]:
            raise AssertionError(f"mask {name} has a wrong name or shape")


def check_param_plan(pp: ParamPlan, source_shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise if the set-pieces do not cover every element exactly once or index out of range."""
    if any(p.is_linear for p in pp.pieces):
        for p in pp.pieces:
            if not p.is_linear or p.out_shape(source_shapes[p.source]) != tuple(pp.shape):
                raise AssertionError(f"{pp.name}: linear piece from {p.source} does not give shape {pp.shape}")
        return
    hits = torch.zeros(pp.shape, dtype=torch.int32)
    for p in pp.pieces:
        src_shape = p.source.shape if p.is_fresh else source_shapes[p.source]
        if len(src_shape) != len(pp.shape):
            raise AssertionError(f"{pp.name}: piece from {p.source} has rank {len(src_shape)}")
        for d in range(len(pp.shape)):
            if p.dst[d] is None:
                if src_shape[d] != pp.shape[d]:
                    raise AssertionError(f"{pp.name}: whole-dim piece from {p.source} has size mismatch")
            else:
                if len(p.dst[d]) and (p.dst[d].max() >= pp.shape[d] or p.src[d].max() >= src_shape[d]):
                    raise AssertionError(f"{pp.name}: index out of range in dim {d}")
        if not p.add:
            write_piece(hits, p.dst, torch.ones(piece_block_shape(p, pp.shape, src_shape), dtype=torch.int32), True)
    if not bool((hits == 1).all()):
        raise AssertionError(f"{pp.name}: {(hits == 0).sum()} elements uncovered, {(hits > 1).sum()} twice")
