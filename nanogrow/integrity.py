"""Content checksums (sha256, hashlib) shared by checkpoints and token shards: one way to hash a file, one way to
say that it does not match. No torch here: data preparation uses it too."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

CHUNK = 1 << 22  # 4 MiB reads: large enough that hashing runs at hashlib's speed, small enough to stream


def sha256_file(path: str | os.PathLike, offset: int = 0, each_chunk: Callable[[bytes], None] | None = None) -> str:
    """Hex sha256 of ``path`` from byte ``offset`` to the end. ``each_chunk`` sees every chunk hashed, so a caller
    can scan the same bytes (e.g. for the largest token id) in the one read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if each_chunk is not None:
                each_chunk(chunk)
    return h.hexdigest()


def digest_tree(root: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative posix path: sha256} of every file under ``root`` except the names in ``skip``."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def mismatch(path: str | os.PathLike, expected: str) -> str | None:
    """None if ``path`` hashes to ``expected``; otherwise what is wrong, in a few words (for a one-line error)."""
    try:
        actual = sha256_file(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if actual != expected:
        return f"is corrupt: sha256 {actual[:16]}... does not match the {expected[:16]}... recorded at save"
    return None
