"""Replacing a small file atomically: readers see the old content or the new, never a part.

The content goes to ``<path>.tmp``, which is renamed over ``path``. With ``sync`` the data is
on disk before the rename (a crash leaves the old file or the new one whole); with
``sync_dir`` the directory is synced too, so the rename itself survives a power loss. Files
whose loss only repeats work (a finalise watermark) skip both. Imports nothing heavy: the
supervisor uses it before it forks.
"""

from __future__ import annotations

import json
import os
from typing import Any


def replace_text(path: str | os.PathLike[str], text: str, sync: bool = True,
                 sync_dir: bool = False) -> None:
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_json(path: str | os.PathLike[str], doc: Any, sync: bool = True,
                 sync_dir: bool = False) -> None:
    replace_text(path, json.dumps(doc), sync, sync_dir)
