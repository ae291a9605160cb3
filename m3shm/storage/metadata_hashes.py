"""Metadata entries as the remote write decoders hand them over, and the set of metadata
hashes already stored that the C decoders read (csrc/rw_series.c, ``m3_rw_out.known``): an entry
whose hash is in the set is not handed over again, so stored metadata costs no Python work."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from m3shm._native import ffi, lib

# MetricType numbers, the same in 1.0's MetricMetadata and 2.0's Metadata.
METRIC_TYPES = ("unknown", "counter", "gauge", "histogram", "gaugehistogram", "summary", "info",
                "stateset")


@dataclass(frozen=True)
class Meta:
    """One metadata entry of a request, keyed by metric name (1.0: the family name; 2.0: the
    series' __name__)."""

    name: str
    type: int
    help: str
    unit: str
    hash: int


class MetaHashSet:
    """The metadata hashes already stored, as the open-addressing set C reads without the GIL
    (power-of-two size, linear probing, 0 = empty, 1 = deleted). Readers may see a stale slot;
    the worst case is an entry offered again, which the store ignores."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.arr = ffi.new("uint64_t[]", size)
        self.state = (self.arr, size)  # read as one: a decode must not mix two arrays
        self.used = 0  # live + deleted slots
        self.live: set[int] = set()
        self._lock = threading.Lock()

    def _probe(self, h: int) -> int:
        mask, i = self.size - 1, h & (self.size - 1)
        tomb = -1
        while True:
            v = self.arr[i]
            if v == h or v == 0:
                return i if v == h or tomb < 0 else tomb
            if v == 1 and tomb < 0:
                tomb = i
            i = (i + 1) & mask

    def add(self, h: int) -> None:
        with self._lock:
            if h in self.live:
                return
            if 2 * (self.used + 1) > self.size:
                self._rebuild(max(self.size, 4 * len(self.live) + 4))
            i = self._probe(h)
            if self.arr[i] == 0:
                self.used += 1
            self.arr[i] = h
            self.live.add(h)

    def discard(self, h: int) -> None:
        with self._lock:
            if h not in self.live:
                return
            self.live.discard(h)
            self.arr[self._probe(h)] = 1

    def __contains__(self, h: int) -> bool:
        return h in self.live

    def _rebuild(self, want: int) -> None:
        size = 1024
        while size < want:
            size *= 2
        arr = ffi.new("uint64_t[]", size)
        self.size, self.arr, self.used = size, arr, 0
        for h in self.live:
            i = self._probe(h)
            arr[i] = h
            self.used += 1
        self.state = (arr, size)


def meta_hash(name: str, type_: int, help_: str, unit: str) -> int:
    """The hash C gives a metadata entry (m3_rw_meta_hash)."""
    n, h, u = name.encode(), help_.encode(), unit.encode()
    return int(lib.m3_rw_meta_hash(n, len(n), type_, h, len(h), u, len(u)))
