"""One job per ``out_dir``: rank 0 of a training run holds an exclusive ``flock`` on ``out_dir/.nanogrow.lock``.

Two jobs writing one directory corrupt each other silently: a second ``train --resume auto`` on a directory whose
run is still going would load its checkpoints mid-rotation and write its own beside them (measured before this
lock). The lock file holds who took it (host, pid, start time, command), so the refusal names the holder.

``flock`` is released by the kernel when the holding process dies, however it dies, so a lock left by a crash is
never "held": the next run takes it over and says whose it was. (On NFS, Linux implements ``flock`` with POSIX
byte-range locks, which NFSv4 servers honour; a filesystem without locks fails loudly at ``flock``.)

A process may hold the lock of a directory once: further Trainers in the same process on the same directory (a
resume in a test, LAG candidates, the Handbook runner's next run) reuse it, since they are the same job.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from .checkpoint import CheckpointError

LOCK_NAME = ".nanogrow.lock"
_HELD: dict[str, int] = {}  # resolved out_dir -> the open file descriptor holding its lock


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300]}


def _describe(info: dict) -> str:
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {info.get('started', '?')}"
            + (f": {info['command']}" if info.get("command") else ""))


def acquire(out_dir: str | os.PathLike, create: bool = True) -> str | None:
    """Take ``out_dir``'s lock for this process; returns a note when a stale lock (its holder gone) was taken over,
    else None. Raises CheckpointError naming the holder when another live process has it. ``create=False`` leaves
    a directory that does not exist alone (nothing there to protect yet) and returns None without a lock."""
    out_dir = Path(out_dir)
    key = str(out_dir.resolve())
    if key in _HELD:
        return None
    if not create and not out_dir.is_dir():
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise CheckpointError(f"{path}: cannot lock the run directory ({e.strerror}); a filesystem without "
                                  f"file locks cannot guard against two jobs in one train.out_dir") from None
        raise CheckpointError(f"train.out_dir {str(out_dir)!r} is in use by another run ({_describe(_read(path))}); "
                              f"wait for it to end or stop it, or set another train.out_dir") from None
    previous = _read(path)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
    os.fsync(fd)
    _HELD[key] = fd
    if previous:
        return f"took over the lock of a run that ended without releasing it ({_describe(previous)})"
    return None


def release(out_dir: str | os.PathLike) -> None:
    """Give the lock back (the file stays, empty: an empty lock file means the last holder ended cleanly)."""
    fd = _HELD.pop(str(Path(out_dir).resolve()), None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _read(path: Path) -> dict:
    try:
        text = path.read_text().strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"host": "?", "note": "unreadable lock file"}
