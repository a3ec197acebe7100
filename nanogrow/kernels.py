"""nanogrow.kernels: fused Triton kernels for the (grown) blocks, each with a plain torch reference, and the
dispatcher that picks one or the other.

    from nanogrow import kernels as K
    backend = K.resolve("auto")              # "torch" if Triton cannot run here; "triton" raises instead
    y = K.rms_norm(x, w, eps, backend)
    h, y = K.add_rms_norm(h, branch, scale, w, eps, backend)   # h + scale * branch, then RMSNorm
    h = K.residual_add(h, branch, scale, backend)              # h + scale * branch (block output)
    a = K.swiglu(gate, up, unit_mask, backend)                 # silu(gate) * up * unit_mask
    q, k = K.rope(q, k, cos, sin, backend)
    loss = K.cross_entropy(logits, targets, backend=backend)   # chunked over the vocabulary
    loss = K.linear_cross_entropy(h, w_head, targets, backend=backend)  # never materialises all logits

Backends: ``"torch"`` runs ``reference.py`` (plain torch, autograd; the fp32 LM-head loss runs ``chunked.py``,
the same maths a chunk of rows at a time); ``"triton"`` runs the custom operators of
``ops.py`` (``torch.ops.nanogrow.*``: fake implementations and autograd registered, so they compose with
torch.compile and FSDP2) and raises if the tensors are on a device Triton cannot serve; ``"auto"`` runs Triton
where it can (CUDA tensors; CPU tensors when the kernels were defined under ``TRITON_INTERPRET=1``) and torch
elsewhere. The growth masks (``scale``, ``unit_mask``) are fused into the kernels: a fade-in costs no extra pass.

Triton is optional: it is imported only when asked for (``load_triton``), or at import if ``TRITON_INTERPRET=1``
is set then — that variable must be set before the ``@triton.jit`` functions are defined.

This module is the package: its ``__path__`` is the repository's top-level ``kernels/`` folder (the code there:
``dispatch.py``, ``reference.py``, ``chunked.py``, ``ops.py``, ``triton_kernels.py``, ``bench.py``), or, in an
installed wheel, ``nanogrow/kernels/`` where pyproject's ``package-dir`` puts those files. ``kernels/`` has no
``__init__.py`` on purpose: with one, a Python started in the checkout's root (``python -m``, ``-c``, pytest, a
script) would import it as the top-level ``kernels``, shadowing Hugging Face's ``kernels`` package that
transformers imports. Without one it is at most a namespace portion, and an installed package of that name wins.
"""
from nanogrow import package_folder

__path__ = [package_folder(__file__, "kernels")]  # a module with __path__ is a package: nanogrow.kernels.ops works

from nanogrow.kernels import chunked, ops, reference  # noqa: E402
from nanogrow.kernels.bench import bench_kernels  # noqa: E402
from nanogrow.kernels.dispatch import (BACKENDS, add_rms_norm, cross_entropy, linear_cross_entropy,  # noqa: E402
                                       load_triton, residual_add, resolve, rms_norm, rope, swiglu, triton_status)

__all__ = ["BACKENDS", "resolve", "triton_status", "load_triton", "rms_norm", "add_rms_norm", "residual_add",
           "swiglu", "rope", "cross_entropy", "linear_cross_entropy", "bench_kernels", "reference", "ops", "chunked"]
