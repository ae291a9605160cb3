"""Blocks to numpy: decode (in C, via m3shm.codec) only the blocks a range needs, then lay
every selected series end to end in one flat array pair.

``FlatSeries`` is the engine's form of a selection: ``ts``/``vals`` hold all samples of all
series, series ``i`` occupying ``[offsets[i], offsets[i+1])``, each sorted by time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from m3shm.query.labels import Labels
from m3shm.query.storage import Block, BlockBatch, Encoding, SelectResult, SeriesBlocks

STALE_BITS = np.uint64(0x7FF0000000000002)
STALE_NAN: float = float(np.array([STALE_BITS], dtype=np.uint64).view(np.float64)[0])


@dataclass
class FlatSeries:
    labels: list[Labels]
    ts: np.ndarray  # int64 ms
    vals: np.ndarray  # float64
    offsets: np.ndarray  # int64, len(labels) + 1
    stitch: Any = None  # the select's Stitch (m3shm.query.resolution), if it has one

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


def _normalise(labels: list[Labels], ts: np.ndarray, vals: np.ndarray, ser: np.ndarray,
               mint: int, maxt: int) -> FlatSeries:
    """Samples tagged with their series index -> FlatSeries: only [mint, maxt], each series
    sorted by time with one sample per timestamp (of equal timestamps, the one that came last
    in block order wins: later streams hold later writes). Sorting happens only when blocks
    overlap (out-of-order writes); the common case is one vectorised check."""
    inside = (ts >= mint) & (ts <= maxt)
    if not inside.all():
        ts, vals, ser = ts[inside], vals[inside], ser[inside]
    if len(ts) > 1:
        ordered = (ser[1:] > ser[:-1]) | ((ser[1:] == ser[:-1]) & (ts[1:] > ts[:-1]))
        if not ordered.all():
            order = np.lexsort((ts, ser))  # stable: equal keys keep block order
            ts, vals, ser = ts[order], vals[order], ser[order]
            last = np.ones(len(ts), dtype=bool)
            last[:-1] = (ser[1:] != ser[:-1]) | (ts[1:] != ts[:-1])
            if not last.all():
                ts, vals, ser = ts[last], vals[last], ser[last]
    offsets = np.searchsorted(ser, np.arange(len(labels) + 1, dtype=ser.dtype)).astype(np.int64)
    return FlatSeries(labels, ts, vals, offsets)


def decode_batch(batch: BlockBatch, mint: int, maxt: int) -> FlatSeries:
    """Decode a whole BlockBatch in one C call and keep the samples inside [mint, maxt]."""
    if not len(batch.counts):
        return FlatSeries(list(batch.labels), np.zeros(0, dtype=np.int64),
                          np.zeros(0, dtype=np.float64), np.zeros(len(batch) + 1, np.int64))
    bser = np.ascontiguousarray(batch.series, dtype=np.int64)
    if len(bser) > 1 and (bser[1:] < bser[:-1]).any():  # make each series' blocks adjacent
        order = np.argsort(bser, kind="stable")
        starts, ends = batch.offsets[:-1][order], batch.offsets[1:][order]
        lens = (ends - starts).astype(np.int64)
        pos = np.repeat(starts.astype(np.int64) - (np.cumsum(lens) - lens), lens) + \
            np.arange(int(lens.sum()))
        data = np.asarray(batch.data)[pos]
        offsets = np.zeros(len(lens) + 1, dtype=np.uint64)
        np.cumsum(lens, out=offsets[1:])
        batch = BlockBatch(batch.labels, data, offsets, bser[order], batch.counts[order],
                           batch.start_ms[order], batch.end_ms[order],
                           None if batch.clip_lo is None else batch.clip_lo[order],
                           None if batch.clip_hi is None else batch.clip_hi[order])
        bser = batch.series
    return _decode_flat(list(batch.labels), batch.data, batch.offsets, bser,
                        int(batch.counts.sum()), mint, maxt, batch.clip_lo, batch.clip_hi)


def _decode_flat(labels: list[Labels], data: np.ndarray, offsets: np.ndarray, bser: np.ndarray,
                 cap: int, mint: int, maxt: int, clip_lo: np.ndarray | None = None,
                 clip_hi: np.ndarray | None = None) -> FlatSeries:
    """csrc/flat_decode.c: decode, keep [mint, maxt] (and each block's clip bounds), merge
    overlapping blocks per series."""
    from m3shm._native import ffi, lib
    from m3shm.errors import check

    offs = np.ascontiguousarray(offsets, dtype=np.uint64)
    ts = np.empty(cap, dtype=np.int64)
    vals = np.empty(cap, dtype=np.float64)
    soffs = np.empty(len(labels) + 1, dtype=np.int64)
    bad = ffi.new("size_t *")
    buf = ffi.from_buffer("uint8_t[]", data)
    i64 = "int64_t[]"
    bmin = ffi.NULL if clip_lo is None else \
        ffi.from_buffer(i64, np.ascontiguousarray(clip_lo, dtype=np.int64))
    bmax = ffi.NULL if clip_hi is None else \
        ffi.from_buffer(i64, np.ascontiguousarray(clip_hi, dtype=np.int64))
    n = lib.m3_decode_flat_clip(buf, len(buf), ffi.from_buffer("uint64_t[]", offs),
                                ffi.from_buffer(i64, bser), bmin, bmax, len(bser), len(labels),
                                mint, maxt, ffi.from_buffer(i64, ts),
                                ffi.from_buffer("double[]", vals), cap,
                                ffi.from_buffer(i64, soffs), bad)
    if n < 0:
        b = int(bad[0])
        who = labels[int(bser[b])] if b < len(bser) and 0 <= bser[b] < len(labels) else "?"
        check(int(n), f"decoding block {b} of {len(bser)} (series {who})")
    return FlatSeries(labels, ts[:n], vals[:n], soffs)


def concat(parts: list[FlatSeries]) -> FlatSeries:
    if len(parts) == 1:
        return parts[0]
    labels = [lb for p in parts for lb in p.labels]
    ts = np.concatenate([p.ts for p in parts]) if parts else np.zeros(0, np.int64)
    vals = np.concatenate([p.vals for p in parts]) if parts else np.zeros(0, np.float64)
    offs = [np.zeros(1, np.int64)]
    base = 0
    for p in parts:
        offs.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])
    return FlatSeries(labels, ts, vals, np.concatenate(offs))


def decode_result(res: SelectResult, mint: int, maxt: int) -> FlatSeries:
    """Every series of a select answer, decoded (batches in one C call each)."""
    parts = [decode_batch(b, mint, maxt) for b in res.batches]
    if res.series or not parts:
        parts.insert(0, decode_series(res.series, mint, maxt))
    flat = concat(parts)
    if res.stitch is not None:
        flat = FlatSeries(flat.labels, flat.ts, flat.vals, flat.offsets, res.stitch)
    return flat


def decode_series(series: list[SeriesBlocks], mint: int, maxt: int) -> FlatSeries:
    """Decode the blocks overlapping [mint, maxt] and keep the samples inside it."""
    batch = _decode_tsz_batch(series, mint, maxt) if series else None
    if batch is not None:
        ts, vals, offsets = batch
        ser = np.repeat(np.arange(len(series), dtype=np.int64), np.diff(offsets))
        return _normalise([s.labels for s in series], ts, vals, ser, mint, maxt)
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
    ser = np.repeat(np.arange(len(series), dtype=np.int64), counts)
    return _normalise([s.labels for s in series], ts, vals, ser, mint, maxt)
