"""The newest checkpointed fileset volume of every block, in shared memory (docs/formats/volptr.md).

One table per namespace, ``<segment path>.vol`` in ``/dev/shm``, created by the supervisor next
to the namespace's segment and opened by path in every worker. Readers
(m3shm/storage/flushed.py) take a shard's (block start, volume) pairs from it instead of listing
the shard's fileset directory; the shard's owner keeps it true (csrc/volptr.c explains the
seqlocks): it rebuilds its shards from the directory at start-up, points a block at volume N+1
once that volume is checkpointed (before volume N is deleted), and clears a block retention
deleted. A shard that is not rebuilt yet, or whose slots overflowed, answers None: the reader
lists the directory as before.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from pathlib import Path

from m3shm._native import ffi, lib
from m3shm.errors import check
from m3shm.shmfile import create_mapped

log = logging.getLogger("m3shm.volptr")


def table_path(segment_path: str) -> str:
    return segment_path + ".vol"


def capacity(retention_ms: int, block_ms: int) -> int:
    """Slots per shard: a power of two above twice the blocks retention keeps, plus room for
    blocks awaiting the next retention pass."""
    need = 2 * (retention_ms // max(block_ms, 1) + 1) + 16
    return 1 << (need - 1).bit_length()


class VolumePointers:
    def __init__(self, path: str, mm: mmap.mmap) -> None:
        self.path, self.mm = path, mm
        self.base = ffi.from_buffer("uint8_t[]", mm, require_writable=True)
        self._n = 64

    @classmethod
    def create(cls, path: str, num_shards: int, retention_ms: int,
               block_ms: int) -> VolumePointers:
        cap = capacity(retention_ms, block_ms)
        size = int(lib.m3_volptr_size(num_shards, cap))
        if not size:
            raise ValueError(f"volume table: bad size for {num_shards} shards x {cap} slots")
        mm = create_mapped(path, size)
        t = cls(path, mm)
        check(lib.m3_volptr_init(t.base, size, num_shards, cap, block_ms),
              f"initialising volume table {path}")
        return t

    @classmethod
    def open(cls, path: str) -> VolumePointers | None:
        """The table at ``path``, or None if there is none (tools, tests of bare segments)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        t = cls(path, mm)
        check(lib.m3_volptr_check(t.base, len(mm)), f"volume table {path}")
        return t

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- owner ------------------------------------------------------------------------------
    def rebuild(self, shard: int, shard_dir: Path) -> None:
        """Point every block of the shard at its newest checkpointed volume on disk, then
        mark the shard ready (start-up, before the shard's first flush)."""
        # not at import: the supervisor imports us
        from m3shm.storage.fileset import complete_volumes

        lib.m3_volptr_reset(self.base, shard)
        best = dict(complete_volumes(shard_dir))  # sorted: a block's newest volume last
        for bs, vol in best.items():
            if not self.set(shard, bs, vol):
                return  # overflowed: readers list the directory
        lib.m3_volptr_set_ready(self.base, shard)

    def set(self, shard: int, block_start: int, volume: int) -> bool:
        """Point the block at ``volume`` (-1: it has no fileset any more). False if the shard
        overflowed (it stays readable by listing)."""
        rc = lib.m3_volptr_set(self.base, shard, block_start, volume)
        if rc == lib.M3_ERANGE:
            log.warning("volume table %s: shard %d has no free slot for block %d; its readers "
                        "list the directory from now on", self.path, shard, block_start)
            return False
        check(rc, f"volume table {self.path}: shard {shard} block {block_start}")
        return True

    # -- readers ----------------------------------------------------------------------------
    def volumes(self, shard: int) -> dict[int, int] | None:
        """{block start: newest volume} of the shard, or None: list the directory."""
        n = ffi.new("size_t *")
        while True:
            starts = ffi.new("int64_t[]", self._n)
            vols = ffi.new("int64_t[]", self._n)
            rc = lib.m3_volptr_list(self.base, shard, starts, vols, self._n, n)
            if rc == lib.M3_ENOSPC:
                self._n = max(self._n * 2, int(n[0]))
                continue
            if rc == lib.M3_ENOENT:
                return None
            check(rc, f"volume table {self.path}: shard {shard}")
            return {int(starts[i]): int(vols[i]) for i in range(n[0])}
