"""What the command line does with an error: one line naming the input at fault for the user's mistakes, the
traceback for bugs (``NANOGROW_DEBUG=1``: the traceback for everything). Shared by ``nanogrow`` and the Hugging Face
converters' entry points."""

from __future__ import annotations

import os
import sys


def user_error(e: BaseException) -> bool:
    """Is ``e`` about the user's inputs (config, data, checkpoint, growth plan, a run gone non-finite) rather than
    a bug? Ours are ValueError / FileNotFoundError / FloatingPointError subclasses defined in nanogrow or
    data_prep, or those exact built-in types raised with a message we wrote."""
    if not isinstance(e, (ValueError, FileNotFoundError, FloatingPointError)):
        return False
    return (type(e).__module__.split(".")[0] in ("nanogrow", "data_prep")
            or type(e) in (ValueError, FileNotFoundError, FloatingPointError))


def run_reporting_errors(prog: str, fn, args) -> int:
    """``fn(args)``; an error about the user's inputs becomes one line on stderr and exit code 2, naming what is at
    fault. Anything else is a bug and keeps its traceback; NANOGROW_DEBUG=1 shows the traceback for everything."""
    try:
        result = fn(args)
        return 0 if result is None else result
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        if os.environ.get("NANOGROW_DEBUG", "") not in ("", "0") or not user_error(e):
            raise
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        return 2
