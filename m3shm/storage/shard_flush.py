"""Write one closed block of one shard from shared memory to an immutable fileset.

The samples never pass through Python: the owner seals the block's chunks (csrc/block.c
``m3_block_seal``), ``m3_block_encode`` re-encodes each series' merged samples as one TSZ
stream with its labels into a buffer, and Python hands the streams, with the canonical labels
as series ids, to :func:`m3shm.storage.fileset.write_fileset` with the block's reverse index segment
(docs/formats/index.md; series id = position in the fileset's index), stored as a section of
the fileset (durable before the checkpoint). Only then are the
chunks released (``m3_block_release``): a flush killed half-way leaves them sealed but in
memory, and the commit log still holds them.

Warm data of a block without a fileset becomes volume 0. Cold data (written after the block
was flushed, or replayed after a restart) becomes volume N+1 = volume N merged with it, series
by series (the cold stream's samples win equal timestamps; decoding and merging run in C via
the codec); then volume N is deleted (readers that mapped it keep reading it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from m3shm import codec
from m3shm.shm import COLD, WARM, Segment, parse_labels
from m3shm.storage.fileset import (
    VERSION,
    Fileset,
    FilesetId,
    Info,
    Kind,
    complete_volumes,
    is_complete,
    write_fileset,
)
from m3shm.storage.index_segment import segment_bytes
from m3shm.storage.reverse_index import ReverseIndex
from m3shm.storage.volptr import VolumePointers

log = logging.getLogger("m3shm.flush")


def encode_block(seg: Segment, shard: int, block_start: int,
                 kind: int = WARM) -> dict[bytes, tuple[int, Any]]:
    """{canonical labels: (hash, TSZ stream)} of the block's sealed chunks."""
    out: dict[bytes, tuple[int, Any]] = {}
    for part in seg.encode_block(shard, block_start, kind):
        data = part.data
        for e in part.entries.tolist():
            _slot, _gen, h, loff, llen, _n, doff, dlen, _a, _b = e
            out[bytes(data[loff : loff + llen])] = (h, data[doff : doff + dlen])
    return out


def _merge(old: Any, new: Any) -> bytes:
    """Volume N's stream merged with cold data: new samples win equal timestamps."""
    import numpy as np

    t0, v0 = codec.decode(old)
    t1, v1 = codec.decode(new)
    ts = np.concatenate([t0, t1])
    vs = np.concatenate([v0, v1])
    order = np.argsort(ts, kind="stable")
    ts, vs = ts[order], vs[order]
    last = np.r_[ts[1:] != ts[:-1], True]
    return codec.encode(ts[last], vs[last])


def newest_volume(root: Path, namespace: str, shard: int, block_start: int) -> int | None:
    vols = complete_volumes(root / namespace / f"{shard:04d}", block_start)
    return vols[-1][1] if vols else None


def write_block(root: Path, fid: FilesetId, block_size: int,
                series: list[tuple[bytes, int, Any]], version: int = VERSION) -> Info:
    return write_fileset(root, fid, block_size, series, revindex=revindex_bytes,
                         version=version)


def revindex_bytes(ids: list[bytes]) -> bytes:
    """The reverse index segment of a fileset whose index holds ``ids`` (id = position)."""
    idx = ReverseIndex()
    for i, sid in enumerate(ids):
        idx.add(i, parse_labels(sid))
    return segment_bytes(idx)


def delete_volume(root: Path, fid: FilesetId) -> None:
    """Remove a superseded volume, checkpoint first (so a crash leaves it incomplete)."""
    paths = [fid.path(root, Kind.CHECKPOINT)] + [fid.path(root, k) for k in Kind
                                                 if k != Kind.CHECKPOINT]
    for p in paths:  # Kind.REVINDEX's path is the v1-2 companion file
        p.unlink(missing_ok=True)


def flush_block(seg: Segment, root: Path, namespace: str, block_size: int, shard: int,
                block_start: int, kind: int = WARM,
                pointers: VolumePointers | None = None) -> Info | None:
    """Seal, encode and write one block (warm or cold data) and release its chunks. Returns
    the new fileset's info, or None if the block held no samples. With ``pointers`` (the
    namespace's table in shared memory) readers are pointed at the new volume before the
    volume it supersedes is deleted."""
    seg.seal(shard, block_start, kind)
    streams = encode_block(seg, shard, block_start, kind)
    info = None
    if streams:
        vol = newest_volume(root, namespace, shard, block_start)
        if vol is None:
            fid = FilesetId(namespace, shard, block_start, 0)
            series = [(sid, h, blk) for sid, (h, blk) in streams.items()]
        else:
            old = FilesetId(namespace, shard, block_start, vol)
            fid = FilesetId(namespace, shard, block_start, vol + 1)
            series = []
            with Fileset(root, old) as fs:
                for sid, h, blk in fs:
                    mine = streams.pop(sid, None)
                    series.append((sid, h, bytes(blk) if mine is None
                                   else _merge(blk, mine[1])))
            series += [(sid, h, blk) for sid, (h, blk) in streams.items()]
        try:
            info = write_block(root, fid, block_size, series)
        except OSError as e:
            # disk full (or another I/O error): remove what was written of the new volume
            # unless its checkpoint made it; the chunks stay sealed in memory and the next
            # pass writes the block again
            if not is_complete(root, fid):
                delete_volume(root, fid)
                for k in Kind:
                    p = fid.path(root, k)
                    p.with_name(p.name + ".tmp").unlink(missing_ok=True)
            log.warning("flush of %s shard %d block %d volume %d failed (%s); its partial "
                        "files are removed and the block stays in memory for the next pass",
                        namespace, shard, block_start, fid.volume, e)
            raise
        if pointers is not None:
            pointers.set(shard, block_start, fid.volume)
        if vol is not None:
            delete_volume(root, FilesetId(namespace, shard, block_start, vol))
    seg.release(shard, block_start, kind)
    return info


__all__ = ["COLD", "WARM", "encode_block", "flush_block", "newest_volume"]
