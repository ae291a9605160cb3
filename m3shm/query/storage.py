"""The one storage abstraction the engine reads from.

For a set of matchers and a time range a store answers with series: a label set plus the
compressed blocks that overlap the range, and a flag saying whether the answer is partial
(a shard or region did not answer). These are the Python mirror of the messages in
``proto/blockstream.proto``; :mod:`m3shm.query.blockstream` converts between the two, so the
in-memory store below, the daemon's shards and remote nodes all plug in the same way.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from m3shm.query.labels import METRIC_NAME, Labels, from_dict, get
from m3shm.query.matchers import Matcher, matches_all

DEFAULT_BLOCK_MS = 2 * 3600 * 1000


class Encoding(enum.IntEnum):
    """How a block's bytes encode samples (persisted: the numbers never change)."""

    TSZ = 1  # m3shm.codec (docs/formats/tsz.md)
    RAW = 2  # n little-endian int64 timestamps, then n little-endian float64 values


@dataclass(frozen=True)
class Block:
    start_ms: int  # first sample's timestamp
    end_ms: int  # last sample's timestamp
    data: bytes
    encoding: Encoding = Encoding.TSZ


@dataclass
class SeriesBlocks:
    labels: Labels
    blocks: list[Block]


@dataclass
class BlockBatch:
    """The blocks of many series in one buffer: the form local stores answer in.

    Block ``i`` is ``data[offsets[i]:offsets[i + 1]]`` (TSZ), holds ``counts[i]`` samples, all
    within ``[start_ms[i], end_ms[i]]``, and belongs to series ``series[i]`` (an index into
    ``labels``). A series' blocks may overlap in time (out-of-order streams of one block): in
    the order given, a later block's sample wins over an earlier one at the same timestamp.
    No Python object per block: the engine decodes the whole buffer in one C call.

    ``clip_lo``/``clip_hi`` (optional, int64 per block): only block ``i``'s samples within
    ``[clip_lo[i], clip_hi[i]]`` belong to the answer. A query across resolutions
    (m3shm/query/resolution.py) takes each series' samples from one namespace per time span
    this way; the decoder drops the others (csrc/flat_decode.c).
    """

    labels: list[Labels]
    data: np.ndarray  # uint8
    offsets: np.ndarray  # uint64, nblocks + 1
    series: np.ndarray  # int64 per block
    counts: np.ndarray  # int64 per block
    start_ms: np.ndarray  # int64 per block (bounds, not necessarily sample times)
    end_ms: np.ndarray  # int64 per block
    clip_lo: np.ndarray | None = None  # int64 per block
    clip_hi: np.ndarray | None = None  # int64 per block
    hashes: np.ndarray | None = None  # uint64 per series: m3_labels_hash, when known

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def samples(self) -> int:
        return int(self.counts.sum())

    def to_series(self) -> list[SeriesBlocks]:
        """One SeriesBlocks per series (for the wire and other per-series consumers)."""
        out = [SeriesBlocks(lbl, []) for lbl in self.labels]
        data = self.data.tobytes()
        offs = self.offsets.tolist()
        clipped = self.clip_lo is not None or self.clip_hi is not None
        for i, (s, a, b) in enumerate(zip(self.series.tolist(), self.start_ms.tolist(),
                                          self.end_ms.tolist(), strict=True)):
            blk = data[offs[i]:offs[i + 1]]
            if clipped:  # per-series consumers have no clip: re-encode the kept samples
                blk, a, b = self._clipped(i, blk, a, b)
                if blk is None:
                    continue
            out[s].blocks.append(Block(a, b, blk, Encoding.TSZ))
        return out

    def _clipped(self, i: int, blk: bytes, a: int, b: int
                 ) -> tuple[bytes | None, int, int]:
        from m3shm import codec

        lo = int(self.clip_lo[i]) if self.clip_lo is not None else a
        hi = int(self.clip_hi[i]) if self.clip_hi is not None else b
        if lo <= a and hi >= b:
            return blk, a, b
        ts, vs = codec.decode(blk)
        keep = (ts >= lo) & (ts <= hi)
        if not keep.any():
            return None, a, b
        ts, vs = ts[keep], vs[keep]
        return codec.encode(ts, vs), int(ts[0]), int(ts[-1])


@dataclass
class SelectResult:
    series: list[SeriesBlocks]
    partial: bool = False
    warnings: list[str] = field(default_factory=list)
    batches: list[BlockBatch] = field(default_factory=list)
    # which namespace (resolution) answered for which times of each series, when the answer
    # stitches namespaces (m3shm.query.resolution.Stitch); None: one resolution throughout
    stitch: Any = None

    @property
    def nseries(self) -> int:
        return len(self.series) + sum(len(b) for b in self.batches)

    def all_series(self) -> list[SeriesBlocks]:
        """Every series as SeriesBlocks, batches materialised."""
        out = list(self.series)
        for b in self.batches:
            out.extend(b.to_series())
        return out


class Storage(Protocol):
    def select(self, matchers: list[Matcher], mint: int, maxt: int) -> SelectResult:
        """Series matching every matcher with blocks overlapping [mint, maxt] (ms)."""
        ...


def encode_block(ts: np.ndarray, vals: np.ndarray, encoding: Encoding = Encoding.TSZ) -> Block:
    ts = np.ascontiguousarray(ts, dtype=np.int64)
    vals = np.ascontiguousarray(vals, dtype=np.float64)
    if encoding == Encoding.TSZ:
        from m3shm import codec

        data = codec.encode(ts, vals)
    else:
        data = ts.astype("<i8").tobytes() + vals.astype("<f8").tobytes()
    return Block(int(ts[0]), int(ts[-1]), data, encoding)


class MemoryStore:
    """Series held in memory as compressed blocks (tests, benchmarks, `load` in scripts)."""

    def __init__(self, block_ms: int = DEFAULT_BLOCK_MS,
                 encoding: Encoding = Encoding.TSZ) -> None:
        self.block_ms = block_ms
        self.encoding = encoding
        self._series: dict[Labels, list[Block]] = {}
        self._by_name: dict[str, list[Labels]] = {}  # metric name -> its series

    def add(self, labels: Labels | dict[str, str], ts: np.ndarray, vals: np.ndarray) -> None:
        """Add samples (sorted, unique timestamps) to a series, cut into aligned blocks."""
        lbl = from_dict(labels) if isinstance(labels, dict) else labels
        ts = np.asarray(ts, dtype=np.int64)
        vals = np.asarray(vals, dtype=np.float64)
        if lbl not in self._series:
            self._by_name.setdefault(get(lbl, METRIC_NAME), []).append(lbl)
        blocks = self._series.setdefault(lbl, [])
        if len(ts) == 0:
            return
        bucket = ts // self.block_ms
        cuts = np.flatnonzero(np.diff(bucket)) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(ts)], strict=True):
            blocks.append(encode_block(ts[a:b], vals[a:b], self.encoding))
        blocks.sort(key=lambda blk: blk.start_ms)

    def add_many(self, items: Iterable[tuple[Labels, np.ndarray, np.ndarray]]) -> None:
        for lbl, ts, vals in items:
            self.add(lbl, ts, vals)

    def clear(self) -> None:
        self._series.clear()
        self._by_name.clear()

    def select(self, matchers: list[Matcher], mint: int, maxt: int) -> SelectResult:
        out = []
        names = [m.value for m in matchers if m.name == METRIC_NAME and m.op == "="]
        candidates = self._by_name.get(names[0], []) if names else list(self._series)
        rest = [m for m in matchers if not (m.name == METRIC_NAME and m.op == "=")] \
            if names and len(set(names)) == 1 else matchers
        for lbl in candidates:
            if rest and not matches_all(rest, lbl):
                continue
            blocks = self._series[lbl]
            sel = [b for b in blocks if b.end_ms >= mint and b.start_ms <= maxt]
            if sel:
                out.append(SeriesBlocks(lbl, sel))
        return SelectResult(out)
