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


# ---- signatures: "written by a host holding this key" ------------------------------------------------------------
# A checkpoint's checksums say its files are the ones written, not who wrote them: anyone can recompute them for
# crafted files. That matters only where loading runs code from a file (DeepSpeed's torch.load of its partitions),
# so every checkpoint's checksums are also signed (HMAC-SHA256) with a key kept outside the checkpoint, and a
# DeepSpeed checkpoint whose signature the loading host cannot verify is refused unless the user says to trust it.
KEY_ENV = "NANOGROW_CHECKPOINT_KEY"  # a key file shared by the hosts of a cluster (e.g. on the shared home)
TRUST_ENV = "NANOGROW_TRUST_CHECKPOINT"  # "1": load checkpoints whose signature does not verify (--trust-checkpoint)


def key_path() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV])
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "nanogrow" / "checkpoint.key"


def host_key(create: bool = True) -> bytes | None:
    """This host's signing key (32 random bytes, file mode 0600), created on first use when ``create``. Several
    processes creating it at once agree on one: each writes its own candidate and links it into place, and the
    first link wins."""
    path = key_path()
    if path.is_file():
        return bytes.fromhex(path.read_text().strip())
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    try:
        os.link(candidate, path)
    except FileExistsError:
        pass  # another process made it first: use theirs
    finally:
        candidate.unlink()
    return bytes.fromhex(path.read_text().strip())


def sign(checksums: dict[str, str], key: bytes | None = None) -> str:
    """HMAC-SHA256 of the {file: sha256} map (canonical JSON) under ``key`` (default: this host's)."""
    import hmac
    import json

    message = json.dumps(checksums, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key if key is not None else host_key(), message, hashlib.sha256).hexdigest()


def signed_here(checksums: dict[str, str], signature: str | None) -> bool:
    """Does ``signature`` verify under this host's key (never creating one)?"""
    import hmac

    key = host_key(create=False)
    return bool(signature) and key is not None and hmac.compare_digest(sign(checksums, key), signature)
