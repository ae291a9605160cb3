"""Test helper: run a function in a forked child process (real processes for crash tests)."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable


def fork_call(fn: Callable[..., object], *args: object) -> int:
    """Fork; the child runs fn(*args) and exits 0, or 1 after printing the exception. Returns
    the child's pid (the caller waits for it, or SIGKILLs it)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(*args)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid
