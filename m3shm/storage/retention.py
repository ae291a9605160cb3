"""Retention: delete whole filesets whose block ended before now - retention.

No compaction ever rewrites data, so retention is the only way data leaves the disk: every
file of an expired block's filesets is removed, all volumes and every format version (v4: its
one file; v3: the content file and its checkpoint; v1/v2: one file per section, the
reverse-index companion and the digests included). A checkpoint goes first, so a deletion cut
short by a crash leaves a fileset without a checkpoint, which readers ignore and start-up removes
(:func:`m3shm.storage.fileset.remove_incomplete`). Readers that still map a deleted fileset
keep reading it until they close it (unlinked files live while mapped).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from m3shm.storage.fileset import NAME, FilesetId

log = logging.getLogger("m3shm.retention")


def expire(root: Path, namespace: str, block_ms: int, shards: range,
           cutoff_ms: int) -> list[FilesetId]:
    """Delete the filesets of ``shards`` whose block ends at or before ``cutoff_ms``."""
    gone: list[FilesetId] = []
    for s in shards:
        d = Path(root) / namespace / f"{s:04d}"
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        expired: dict[tuple[int, int], list[str]] = {}
        for n in names:
            m = NAME.match(n)
            if m and int(m.group(1)) + block_ms <= cutoff_ms:
                expired.setdefault((int(m.group(1)), int(m.group(2))), []).append(n)
        for (bs, vol), files in sorted(expired.items()):
            files.sort(key=lambda n: not n.endswith("-checkpoint.db"))  # checkpoint first
            for n in files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(d / n)
            gone.append(FilesetId(namespace, s, bs, vol))
        if expired:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if gone:
        log.info("retention: deleted %d expired filesets of namespace %s", len(gone),
                 namespace)
    return gone
