"""Run logs through :mod:`logging`: one line per message, flushed as it is written, rank 0 only by default.

With stdout redirected (SLURM ``--output``, ``nohup``, ``> log``) Python block-buffers ``print``, and a training
log stays empty for minutes. Every line here goes through a handler that flushes after each record, to stdout and
(during a run) to ``out_dir/train.log``. Under torchrun each line starts with ``[rank R]``; ranks other than 0 are
silent unless ``NANOGROW_LOG_RANKS=all`` (their warnings and errors still show).

    get_logger("config").warning("...")   # a child of the "nanogrow" logger; the console handler comes on first use
    log = RunLog(out_dir, rank=rank)      # the Trainer's log: console + out_dir/train.log (rank 0, appended)
    log("step 10 | loss 4.2")
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from . import dist_utils

ROOT = "nanogrow"


class _RankFormatter(logging.Formatter):
    """``[rank R] message`` under torch.distributed, the message alone on one process; the file adds a time."""

    def __init__(self, with_time: bool = False):
        super().__init__("%(asctime)s %(message)s" if with_time else "%(message)s", datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING and not record.getMessage().lower().startswith(("warning", "error")):
            text = f"{record.levelname.lower()}: {text}"
        if dist_utils.is_distributed():
            text = f"[rank {dist_utils.rank()}] {text}"
        return text


class _RankFilter(logging.Filter):
    """Drop INFO (and below) from ranks other than 0, unless NANOGROW_LOG_RANKS=all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or os.environ.get("NANOGROW_LOG_RANKS", "") == "all":
            return True
        return dist_utils.rank() == 0


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (pytest's capture, a redirect set later), flushing after
    every record (``StreamHandler.emit`` flushes)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always answers sys.stdout
        pass


def _root() -> logging.Logger:
    """The "nanogrow" logger with its console handler (installed once, unless the application gave it
    handlers of its own)."""
    logger = logging.getLogger(ROOT)
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(_RankFormatter())
        handler.addFilter(_RankFilter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # one copy of each line, even when the application configures the root logger
    return logger


def get_logger(name: str = "") -> logging.Logger:
    """``nanogrow.<name>``, with the console handler in place."""
    root = _root()
    return root.getChild(name) if name else root


class RunLog:
    """The Trainer's ``log``: each line to the console (the "nanogrow.train" logger, or the callable given) and,
    on rank 0, appended to ``out_dir/train.log`` with a time stamp. The file is opened for each line and closed
    again: nothing stays open between lines, and a Trainer that is never run leaves no handle behind."""

    def __init__(self, out_dir: str | Path, console=None, rank: int = 0):
        self.path = Path(out_dir) / "train.log"
        self.console = console if console is not None else get_logger("train").info
        self.rank = rank

    def __call__(self, msg: str, *args, **kwargs) -> None:
        self.console(msg)
        if self.rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(f"{stamp} {line}\n" for line in str(msg).splitlines() or [""]))

    def start_afresh(self) -> None:
        """A fresh run (not a resume): the log starts empty."""
        if self.rank == 0 and self.path.is_file():
            self.path.unlink()
