"""Progress of long work (``nanogrow prep``, ``nanogrow handbook run``): a tqdm bar on a terminal, and where the
output goes to a file or a pipe (a cluster job's log, ``nohup``), a plain line at most every ``LOG_EVERY`` seconds,
since a bar's carriage returns would fill such a log with thousands of redrawn lines."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

LOG_EVERY = 30.0  # seconds between progress lines off a terminal (tests lower it)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for the end of a log line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts ``unit`` done (of ``total``, where known) with a rate, and an ETA where ``total`` is known.

    On a terminal (``file.isatty()``, or ``tty=True``) a tqdm bar on ``file`` (stderr by default); otherwise
    ``log`` gets one line at most every ``every`` seconds (``LOG_EVERY``), none before the first interval has
    passed, so a short job logs nothing extra. ``counts`` given to ``update`` (e.g. documents) ride along.
    """

    def __init__(self, desc: str, unit: str, total: int | None = None, *, log: Callable[[str], None] = print,
                 file=None, tty: bool | None = None, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.desc, self.unit, self.total, self.log, self.clock = desc, unit, total, log, clock
        self.file = sys.stderr if file is None else file
        self.tty = bool(getattr(self.file, "isatty", lambda: False)()) if tty is None else tty
        self.every = LOG_EVERY if every is None else every
        self.done, self.counts = 0, {}
        self.t0 = self.last = clock()
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", unit_scale=True, file=self.file,
                            dynamic_ncols=True)

    def update(self, done: int, **counts: int) -> None:
        """Set the count done so far (absolute, not an increment) and the counts that ride along."""
        self.counts = counts
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(f"{v:,} {k}" for k, v in counts.items()), refresh=False)
            self.bar.update(done - self.done)
        self.done = done
        if self.bar is None and self.clock() - self.last >= self.every:
            self.last = self.clock()
            self.log(self.line())

    def line(self) -> str:
        """``prep: 1,234,567 of 2,000,000 tokens (62%), 12,345 documents, 250,000 tokens/s, ETA 3s``"""
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = self.done / elapsed
        of = f" of {self.total:,}" if self.total else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc}: {self.done:,}{of} {self.unit}{pct}",
                 *(f"{v:,} {k}" for k, v in self.counts.items()), f"{rate:,.0f} {self.unit}/s"]
        if self.total and rate > 0:
            parts.append(f"ETA {duration(max(self.total - self.done, 0) / rate)}")
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunEta:
    """The time left for queued runs from the runs finished so far: their mean wall-clock seconds times the runs
    left, divided over the jobs that run them at once (runs in progress count as left: a rough, cautious ETA)."""

    def __init__(self, jobs: int = 1):
        self.jobs, self.seconds = jobs, []

    def add(self, record: dict) -> None:
        if record.get("copied_from"):  # copied from another study's store: took no time here
            return
        # The run's own wall-clock: building it, training, and its final validation (fields execute() records).
        self.seconds.append(sum(record.get(k) or 0.0 for k in ("wall_seconds", "setup_seconds",
                                                                "final_eval_seconds")))

    def eta(self, left: int) -> str:
        """``ETA 4m10s``; empty until a run has finished (nothing to estimate from) and when nothing is left."""
        if not self.seconds or left <= 0:
            return ""
        mean = sum(self.seconds) / len(self.seconds)
        return f"ETA {duration(mean * left / min(self.jobs, left))}"

    def note(self, done: int, left: int, queued: str = "to go", starting: int = 0) -> str:
        """``2 done, 3 to go, ETA 4m10s``: what the runner appends to a run's log line; ``starting`` runs (about to
        start, not counted in ``left``) are in the ETA."""
        eta = self.eta(left + starting)
        return f"{done} done, {left} {queued}" + (f", {eta}" if eta else "")
