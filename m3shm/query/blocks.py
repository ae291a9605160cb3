"""Blocks to numpy: decode (in C, via m3shm.codec) only the blocks a range needs, then lay
every selected series end to end in one flat array pair.

``FlatSeries`` is the engine's form of a selection: ``ts``/``vals`` hold all samples of all
series, series ``i`` occupying ``[offsets[i], offsets[i+1])``, each sorted by time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m3shm.query.labels import Labels
from m3shm.query.storage import Block, Encoding, SeriesBlocks

STALE_BITS = np.uint64(0x7FF0000000000002)
STALE_NAN: float = float(np.array([STALE_BITS], dtype=np.uint64).view(np.float64)[0])


@dataclass
class FlatSeries:
    labels: list[Labels]
    ts: np.ndarray  # int64 ms
    vals: np.ndarray  # float64
    offsets: np.ndarray  # int64, len(labels) + 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def keep(self, mask: np.ndarray) -> FlatSeries:
        """Only the samples where ``mask`` holds (series stay, possibly empty)."""
        cm = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
        return FlatSeries(self.labels, self.ts[mask], self.vals[mask], cm[self.offsets])


def is_stale(vals: np.ndarray) -> np.ndarray:
    return vals.view(np.uint64) == STALE_BITS


def decode_block(block: Block) -> tuple[np.ndarray, np.ndarray]:
    if block.encoding == Encoding.TSZ:
        from m3shm import codec

        return codec.decode(block.data)
    if block.encoding == Encoding.RAW:
        n = len(block.data) // 16
        ts = np.frombuffer(block.data, dtype="<i8", count=n).astype(np.int64)
        vs = np.frombuffer(block.data, dtype="<f8", count=n, offset=8 * n).astype(np.float64)
        return ts, vs
    raise ValueError(f"unknown block encoding {block.encoding}")


def _decode_tsz_batch(series: list[SeriesBlocks], mint: int, maxt: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """All needed blocks decoded in one C call (m3shm.codec.decode_many), when all are TSZ."""
    datas: list[bytes] = []
    per_series = np.zeros(len(series), dtype=np.int64)
    for i, s in enumerate(series):
        for b in s.blocks:
            if b.end_ms < mint or b.start_ms > maxt:
                continue
            if b.encoding != Encoding.TSZ:
                return None
            datas.append(b.data)
            per_series[i] += 1
    from m3shm import codec

    offs = np.zeros(len(datas) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in datas], out=offs[1:])
    ts, vs, sample_offs = codec.decode_many(b"".join(datas), offs)
    block_end = np.cumsum(per_series)
    offsets = np.concatenate(([0], sample_offs[block_end])).astype(np.int64)
    return ts, vs, offsets


def decode_series(series: list[SeriesBlocks], mint: int, maxt: int) -> FlatSeries:
    """Decode the blocks overlapping [mint, maxt] and keep the samples inside it."""
    batch = _decode_tsz_batch(series, mint, maxt) if series else None
    if batch is not None:
        ts, vals, offsets = batch
        flat = FlatSeries([s.labels for s in series], ts, vals, offsets)
        inside = (ts >= mint) & (ts <= maxt)
        return flat if inside.all() else flat.keep(inside)
    ts_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    counts = np.zeros(len(series), dtype=np.int64)
    for i, s in enumerate(series):  # a loop over blocks; samples stay in C and numpy
        for b in s.blocks:
            if b.end_ms < mint or b.start_ms > maxt:
                continue
            t, v = decode_block(b)
            ts_parts.append(t)
            val_parts.append(v)
            counts[i] += len(t)
    offsets = np.zeros(len(series) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if ts_parts:
        ts = np.concatenate(ts_parts)
        vals = np.concatenate(val_parts)
    else:
        ts = np.zeros(0, dtype=np.int64)
        vals = np.zeros(0, dtype=np.float64)
    flat = FlatSeries([s.labels for s in series], ts, vals, offsets)
    inside = (ts >= mint) & (ts <= maxt)
    if not inside.all():
        flat = flat.keep(inside)
    return flat
