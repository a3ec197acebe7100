"""Reading torch.distributed.checkpoint (DCP) directories without running code from them.

DCP as shipped unpickles on load in two places: ``FileSystemReader.read_metadata`` is a plain ``pickle.load`` of
``.metadata``, and ``DefaultLoadPlanner.load_bytes`` is ``torch.load(weights_only=False)`` on every non-tensor
("byte") entry. A crafted checkpoint runs arbitrary code through either. We keep DCP (it reshards on load, which is
why it is here) and close both doors by construction:

- ``.metadata`` is read by ``read_metadata`` below, an unpickler that can build only DCP's metadata dataclasses,
  torch sizes, dtypes and layouts, and path objects; any other global (``os.system``, ``builtins.eval``, ...) is
  refused before it is looked up, so nothing outside that list can be constructed or called.
- nanogrow writes no byte entries (checkpoint.py keeps optimizer hyper-parameters in meta.json), and
  ``TensorsOnlyPlanner`` refuses to plan or load one. Tensors are read by DCP with ``torch.load(weights_only=True)``.
- ``SafeReader`` hands DCP the metadata already read (so it is unpickled once, by us) and checks each data file
  against its recorded checksum the first time this rank is about to read it (``verify``, from checkpoint.py).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType

_MD = "torch.distributed.checkpoint.metadata"
# Exactly what DCP (torch 2.x) pickles into .metadata; measured by recording find_class on real checkpoints.
ALLOWED_GLOBALS = frozenset({
    (_MD, "Metadata"), (_MD, "TensorStorageMetadata"), (_MD, "BytesStorageMetadata"), (_MD, "ChunkStorageMetadata"),
    (_MD, "TensorProperties"), (_MD, "MetadataIndex"), (_MD, "StorageMeta"), (_MD, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # where each entry lives (file, offset, length)
    ("torch", "Size"), ("torch.serialization", "_get_layout"),  # _get_layout: a torch.layout looked up by name
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
})


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that would need code execution (or a byte entry) to load; the message names it."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which a DCP metadata file never contains")


def read_metadata(path: str | Path) -> Metadata:
    """The DCP metadata of checkpoint directory ``path``, built only from the allowed classes.
    Any failure is an ``UnsafeCheckpoint`` (refused global) or ``ValueError`` (unreadable) naming the file."""
    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if "never contains" in str(e):
            raise UnsafeCheckpoint(f"{file}: refused to load: {e} (a crafted file would run code here)") from None
        raise ValueError(f"{file}: not a readable DCP metadata file ({e})") from None
    except (EOFError, OSError, AttributeError, TypeError, IndexError, KeyError, ValueError) as e:
        raise ValueError(f"{file}: not a readable DCP metadata file ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata):
        raise ValueError(f"{file}: holds a {type(md).__name__}, not DCP Metadata")
    return md


class TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's default load planner minus byte entries: planning one is an error, loading one never happens."""

    def create_local_plan(self):
        plan = super().create_local_plan()
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise UnsafeCheckpoint(f"entry {item.dest_index.fqn!r} is a pickled (byte) entry; nanogrow "
                                       f"checkpoints hold tensors only and byte entries are never unpickled")
        return plan

    def load_bytes(self, read_item, value) -> None:  # unreachable after create_local_plan; kept as a wall
        raise UnsafeCheckpoint(f"entry {read_item.dest_index.fqn!r} is a pickled (byte) entry; refused")


class SafeReader(FileSystemReader):
    """A FileSystemReader that returns metadata read by ``read_metadata`` and calls ``verify(relative_path)`` once
    per data file before this rank reads from it (each rank checks exactly the files its shards come from)."""

    def __init__(self, path: str | Path, metadata: Metadata, verify: Callable[[str], None]):
        super().__init__(str(path))
        self._metadata, self._verify, self._verified = metadata, verify, set()

    def read_metadata(self, *args, **kwargs) -> Metadata:
        md = self._metadata
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan, planner):
        for rel in sorted({self.storage_data[item.storage_index].relative_path for item in plan.items}):
            if rel not in self._verified:
                self._verify(rel)
                self._verified.add(rel)
        return super().read_data(plan, planner)
