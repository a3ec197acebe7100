"""The dispatcher behind ``nanogrow.kernels``: which backend runs (``resolve``), each kernel's entry point choosing
the Triton kernel or its torch reference, and the lazy Triton import. ``nanogrow/kernels.py`` re-exports it; see
that module's docstring for the API."""

import importlib.util
import os

import torch

from . import chunked, ops, reference

BACKENDS = ("auto", "triton", "torch")

_triton = None  # the triton_kernels module once loaded; False once loading has failed
_triton_error = ""


def load_triton():
    """Import the Triton kernels (defining them for the interpreter if ``TRITON_INTERPRET=1`` is set now).
    Returns the module, or raises ImportError saying why Triton is unavailable (the answer is cached)."""
    global _triton, _triton_error
    if _triton is None:
        try:
            if importlib.util.find_spec("triton") is None:
                raise ModuleNotFoundError("triton is not installed (pip install 'nanogrow[triton]', which pins "
                                          "triton==3.7.1)")
            from . import triton_kernels
            _triton = triton_kernels
        except Exception as e:  # not installed, or a broken install: "auto" falls back to torch
            _triton = False
            _triton_error = str(e) if isinstance(e, ModuleNotFoundError) else f"importing Triton failed: {e!r}"
    if _triton is False:
        raise ImportError(_triton_error)
    return _triton


def triton_status(device: torch.device | str | None = None) -> str | None:
    """None if the Triton kernels can run on ``device`` (None or meta: on whatever this machine has), else the
    reason they cannot."""
    dev = None if device is None or torch.device(device).type == "meta" else torch.device(device)
    interp, cuda = os.environ.get("TRITON_INTERPRET") == "1", torch.cuda.is_available()
    on_cpu = dev.type == "cpu" if dev is not None else not cuda
    usable = interp if on_cpu else cuda and (dev is None or dev.type == "cuda")
    if not usable:
        where = "this machine" if dev is None else f"device {str(dev)!r}"
        return (f"Triton needs a CUDA device, or TRITON_INTERPRET=1 for its CPU interpreter (tests only); "
                f"{where} has neither")
    try:
        tk = load_triton()
    except ImportError as e:
        return str(e)
    if on_cpu and not tk.INTERPRET:
        return ("TRITON_INTERPRET=1 was set after the Triton kernels were defined; set it before the first "
                "import of nanogrow.kernels / load_triton()")
    return None


def resolve(setting: str, device: torch.device | str | None = None, key: str = "model.kernels") -> str:
    """The backend to pass to the kernel functions for a ``kernels`` setting: "torch" when Triton cannot run
    on ``device`` (None: on anything this machine has) and the setting is "auto", else the setting itself
    ("auto" then still falls back to torch per call for tensors on a device Triton cannot serve).
    Raises ValueError for an unknown setting and RuntimeError for "triton" when Triton cannot run."""
    if setting not in BACKENDS:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, BACKENDS))}, got {setting!r}")
    if setting == "torch":
        return "torch"
    reason = triton_status(device)
    if reason is None:
        return setting
    if setting == "triton":
        raise RuntimeError(f"{key}='triton' but the Triton kernels cannot run: {reason}. "
                           f"Use {key}='auto' (Triton where possible) or 'torch'.")
    return "torch"


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if x.is_cuda:
        if _triton is None:
            try:
                load_triton()
            except ImportError:
                pass
        ok = bool(_triton)
    else:
        ok = x.device.type == "cpu" and bool(_triton) and _triton.INTERPRET
    if not ok and backend == "triton":
        raise RuntimeError(f"kernels='triton' cannot run on {x.device} tensors: "
                           f"{triton_status(x.device) or 'Triton was not loaded (call load_triton())'}")
    return ok


def _scale_vector(scale: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The fade-in scale as the kernels read it: [n] fp32 (a scalar block mask is broadcast)."""
    if scale is None:
        return None
    return scale.to(torch.float32).expand(n).contiguous()


# ----------------------------------------------------------------------------------------------------------
# The dispatching functions: same signature and semantics whichever backend runs
# ----------------------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    if not _use_triton(backend, x):
        return reference.rms_norm(x, weight, eps)
    y, _ = ops.rms_norm(x.contiguous(), weight.contiguous(), float(eps))
    return y


def add_rms_norm(h: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    if not _use_triton(backend, h):
        return reference.add_rms_norm(h, branch, scale, weight, eps)
    h_out, y, _ = ops.add_rms_norm(h.contiguous(), branch.contiguous(), _scale_vector(scale, h.shape[-1]),
                                   weight.contiguous(), float(eps))
    return h_out, y


def residual_add(h: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    if not _use_triton(backend, h):
        return reference.residual_add(h, branch, scale)
    return ops.scaled_add(h.contiguous(), branch.contiguous(), _scale_vector(scale, h.shape[-1]),
                          torch.promote_types(h.dtype, branch.dtype))


def swiglu(gate: torch.Tensor, up: torch.Tensor, unit_mask: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    if not _use_triton(backend, gate):
        return reference.swiglu(gate, up, unit_mask)
    return ops.swiglu(gate.contiguous(), up.contiguous(), _scale_vector(unit_mask, gate.shape[-1]))


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    if not _use_triton(backend, q):
        return reference.rope(q, k, cos, sin)
    return ops.rope(q.contiguous(), k.contiguous(), cos.float().contiguous(), sin.float().contiguous(), False)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  backend: str = "auto") -> torch.Tensor:
    """Mean cross-entropy of logits [..., V] against targets [...], skipping ``ignore_index``."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if not _use_triton(backend, logits):
        return reference.cross_entropy(logits, targets, ignore_index)
    rows, _ = ops.cross_entropy(logits.contiguous(), targets.contiguous(), int(ignore_index))
    return rows.sum() / (targets != ignore_index).sum()


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         backend: str = "auto") -> torch.Tensor:
    """Mean cross-entropy of h @ weight.T (h [..., D], weight [V, D]) without materialising the logits of all
    tokens at once on the Triton path. Under autocast the matmuls run in the autocast dtype, as F.linear would."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if not _use_triton(backend, h):
        if h.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
            return chunked.linear_cross_entropy(h, weight, targets, ignore_index)  # same maths, fewer passes
        return reference.linear_cross_entropy(h, weight, targets, ignore_index)
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dt), weight.to(dt)
    elif h.dtype != weight.dtype:
        raise TypeError(f"linear_cross_entropy: h is {h.dtype} but weight is {weight.dtype}")
    compute_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, _, _ = ops.linear_cross_entropy(h.contiguous(), weight.contiguous(), targets.contiguous(),
                                          int(ignore_index), compute_grad)
    return loss


if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter must be chosen when the kernels are defined
    try:
        load_triton()
    except ImportError:
        pass

__all__ = ["BACKENDS", "resolve", "triton_status", "load_triton", "rms_norm", "add_rms_norm", "residual_add",
           "swiglu", "rope", "cross_entropy", "linear_cross_entropy", "reference", "ops", "chunked"]
