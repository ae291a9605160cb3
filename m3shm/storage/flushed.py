"""Read API over flushed blocks: the newest checkpointed fileset volume of each block.

``FlushedStore(root)`` is what readers (export, the query service) use; any worker may read any
shard's filesets. For (namespace, shard, time range) :meth:`FlushedStore.volumes` lists the
newest checkpointed volume of every block overlapping the range; :meth:`open` returns the
fileset (mmap'd, cached), whose ``get(id, hash)`` looks a series' compressed block up (bloom ->
summaries -> index -> data) and whose iteration yields (id, hash, block) in id order;
:meth:`series_labels` iterates a fileset's series as label dicts; :meth:`reverse_index` opens
the block's reverse index segment (series id = position in the fileset).

Which volume is newest: the namespace's table in shared memory (m3shm/storage/volptr.py,
attached with :meth:`FlushedStore.attach`) when its shard is ready, else a listing of the
shard's directory (tools, or a shard whose owner has not rebuilt it yet).

Volumes and readers: a cold-write flush writes volume N+1 of a block and then deletes volume N.
A reader that already mapped volume N keeps reading it (unlinking a mapped file does not take
its pages away), so "deleted once no reader holds it" is what the kernel does for us; a reader
that listed volume N but finds it gone when opening it lists again and gets N+1
(:meth:`open_newest`). The cache closes a volume once a newer one of the same block is opened.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from m3shm.errors import CorruptError
from m3shm.shm import parse_labels
from m3shm.storage.fileset import (
    CorruptFilesetError,
    Fileset,
    FilesetId,
    Kind,
    complete_volumes,
)
from m3shm.storage.index_segment import SegmentReader
from m3shm.storage.volptr import VolumePointers


class FlushedStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._open: dict[FilesetId, Fileset] = {}
        self._lock = threading.Lock()
        self.pointers: dict[str, VolumePointers] = {}

    def attach(self, namespace: str, table: VolumePointers) -> None:
        """Find the newest volumes of ``namespace`` through ``table``."""
        self.pointers[namespace] = table

    def newest(self, namespace: str, shard: int) -> dict[int, int]:
        """{block start: newest checkpointed volume} of a shard: from the shared-memory table
        if it is ready, else by listing the directory."""
        table = self.pointers.get(namespace)
        best = table.volumes(shard) if table is not None else None
        if best is not None:
            return best
        # sorted: the newest volume of each block comes last
        return dict(complete_volumes(self.root / namespace / f"{shard:04d}"))

    def volumes(self, namespace: str, shard: int, mint: int = -(1 << 62),
                maxt: int = 1 << 62, errors: list[str] | None = None) -> list[FilesetId]:
        """Newest checkpointed volume of each block with data in [mint, maxt], by start.
        With ``errors``, a volume that fails its checks on open is left out and its error
        (naming the file) appended there, so the other blocks stay readable; without, the
        CorruptError is raised."""
        best = self.newest(namespace, shard)
        out = []
        for bs in sorted(best):
            fid = FilesetId(namespace, shard, bs, best[bs])
            if bs > maxt:
                continue
            try:
                fs = self.open_newest(fid)
            except CorruptError as e:
                if errors is None:
                    raise
                errors.append(str(e))
                continue
            if fs is None:
                continue
            if fs.fid.block_start + fs.info.block_size <= mint:
                continue
            out.append(fs.fid)
        return out

    def open(self, fid: FilesetId) -> Fileset:
        """The fileset, opened once and cached. FileNotFoundError if it was deleted."""
        with self._lock:
            fs = self._open.get(fid)
            if fs is not None:
                return fs
        fs = Fileset(self.root, fid)
        with self._lock:
            have = self._open.get(fid)
            if have is not None:
                fs.close()
                return have
            self._open[fid] = fs
            for old in [k for k in self._open if k.namespace == fid.namespace and
                        k.shard == fid.shard and k.block_start == fid.block_start and
                        k.volume < fid.volume]:
                self._open.pop(old).close()
            return fs

    def open_newest(self, fid: FilesetId) -> Fileset | None:
        """Open ``fid``, or the newest volume of its block if ``fid`` was deleted meanwhile
        (None when the block is gone altogether, e.g. by retention)."""
        for _ in range(5):
            try:
                return self.open(fid)
            except FileNotFoundError:
                newer = [v for v in self.volumes_of_block(fid) if v.volume > fid.volume]
                if not newer:
                    self.forget(fid)
                    return None
                fid = newer[-1]
        return None

    def volumes_of_block(self, fid: FilesetId) -> list[FilesetId]:
        table = self.pointers.get(fid.namespace)
        best = table.volumes(fid.shard) if table is not None else None
        if best is not None:
            vol = best.get(fid.block_start)
            return [] if vol is None else [FilesetId(fid.namespace, fid.shard,
                                                     fid.block_start, vol)]
        d = self.root / fid.namespace / f"{fid.shard:04d}"
        return [FilesetId(fid.namespace, fid.shard, bs, vol)
                for bs, vol in complete_volumes(d, fid.block_start)]

    def forget(self, fid: FilesetId) -> None:
        """Close a cached fileset (retention deleted it)."""
        with self._lock:
            fs = self._open.pop(fid, None)
        if fs is not None:
            fs.close()

    def series_labels(self, fid: FilesetId) -> Iterator[dict[str, str]]:
        """Every series of the fileset as a label dict, in id order."""
        fs = self.open(fid)
        for sid, _h, _block in fs:
            yield parse_labels(sid)

    def reverse_index(self, fid: FilesetId) -> SegmentReader:
        """The block's reverse index segment (close it when done)."""
        fs = self.open(fid)
        rev = fs.revindex()
        if fs.version < 3:
            return SegmentReader(fs.paths[Kind.REVINDEX])
        if rev is None:
            raise CorruptFilesetError(fs.paths[Kind.CONTENT], 0, "a revindex section")
        return SegmentReader(fs.paths[Kind.CONTENT], rev)

    def close(self) -> None:
        with self._lock:
            items = list(self._open.values())
            self._open.clear()
        for fs in items:
            with contextlib.suppress(Exception):
                fs.close()
