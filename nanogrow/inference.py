"""What ``nanogrow sample`` and ``nanogrow eval`` share: a trained model on a device, ready to run, and the
tokenizer of its run.

A model comes from a checkpoint directory or a run directory (its newest checkpoint) through
``offline.load_model``, the loader ``export-hf`` and ``grow`` use: any shape a run grew to, growth masks as saved,
DCP checkpoints written by one process or sharded by several (DCP reshards on load), DeepSpeed ones consolidated.
The tokenizer is the one the run trained on: ``run_config.data.dir/tokenizer.json`` (a relative ``data.dir`` is
relative to the directory the run was started from), or one given explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import offline
from .checkpoint import CheckpointError, latest_checkpoint
from .hf import special_tokens, tokenizer_source
from .model import Transformer


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (it holds meta.json), or a run directory's newest complete checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{str(p)!r} does not exist (expected a checkpoint directory ckpt_XXXXXXX or a run "
                              f"directory holding them)")
    if p.is_dir() and not (p / "meta.json").exists():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"{str(p)!r} is neither a checkpoint (no meta.json) nor a run directory with a "
                                  f"complete checkpoint (no ckpt_XXXXXXX/meta.json in it)")
        return latest
    return p


def pick_device(name: str | None) -> torch.device:
    """``name`` as a torch device; None: cuda when this torch has a GPU, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} but this torch ({torch.__version__}) sees no CUDA device; use "
                         f"--device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: nanogrow runs models on cpu or cuda")
    return device


def load_for_inference(path: str | Path, device: torch.device) -> tuple[Transformer, dict, Path]:
    """(model in eval mode on ``device``, fp32, its checkpoint's meta, the checkpoint directory) of a checkpoint
    or a run directory. On CPU the reference kernels run (a run trained with ``kernels = "triton"`` on a GPU
    loads anywhere); on CUDA the saved setting does."""
    ckpt = resolve_checkpoint(path)
    model, _, meta = offline.load_model(ckpt, kernels="torch" if device.type == "cpu" else None)
    return model.to(device).eval(), meta, ckpt


class RunTokenizer:
    """A run's tokenizer (HF ``tokenizers``), its file and the ids that open and close a document."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.path = path
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception subclass for a malformed file
            raise ValueError(f"tokenizer {str(path)!r} cannot be read: {e}") from None
        try:  # nanogrow's data: eot before every document (meta.json eot_id); an imported model: its bos / eos
            bos, eos = special_tokens(path)
            self.bos_id, self.eos_id = self.tok.token_to_id(bos), self.tok.token_to_id(eos)
        except ValueError:
            self.bos_id = self.eos_id = None

    @classmethod
    def of_run(cls, meta: dict, tokenizer: str | Path | None = None) -> "RunTokenizer":
        """The tokenizer the run trained with (or ``tokenizer``, a tokenizer.json or a directory holding one)."""
        path, why = tokenizer_source(meta, tokenizer)
        if path is None:
            raise ValueError(f"the checkpoint's tokenizer is not found: {why}")
        return cls(path)

    def identity(self) -> str:
        """sha256 of the tokenizer's canonical JSON: equal for the same vocabulary, merges, specials and
        normalisation, whatever the file's formatting."""
        import hashlib

        return hashlib.sha256(json.dumps(json.loads(self.tok.to_str()), sort_keys=True).encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
