"""Give freed heap memory back to the kernel after a large query (glibc ``malloc_trim``).

A query over a million series allocates hundreds of MB on the query threads; glibc keeps what
they free in per-thread arenas (and, once a large block was freed, raises its mmap threshold so
later large arrays come from the heap too), so a worker's resident memory stays at its largest
query's peak. ``trim()`` returns the free pages of every arena; the query API calls it after a
query finishes, at most once per ``MIN_INTERVAL_S`` per process. Elsewhere than glibc it does
nothing. Measured by perf/memory.py (PSS per series after a query).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

MIN_INTERVAL_S = 1.0

_lock = threading.Lock()
_last = 0.0
_fn = None
try:
    _fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    _fn.argtypes = [ctypes.c_size_t]
    _fn.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc
    _fn = None


def trim(force: bool = False) -> bool:
    """Release free heap pages to the kernel; False when skipped (too soon, or not glibc)."""
    global _last
    if _fn is None:
        return False
    with _lock:
        now = time.monotonic()
        if not force and now - _last < MIN_INTERVAL_S:
            return False
        _last = now
    _fn(0)
    return True
