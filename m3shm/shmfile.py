"""Fresh shared-memory files: the segment, its aggregation store, its volume table and the
stats file are each created the same way (replacing a previous boot's file, owner-only, sized
sparse, mapped shared read-write)."""

from __future__ import annotations

import contextlib
import mmap
import os


def create_mapped(path: str, size: int) -> mmap.mmap:
    """Replace any file at ``path`` with a new sparse one of ``size`` bytes (mode 0600) and
    map it shared, read-write. Pages are allocated only as they are touched."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
