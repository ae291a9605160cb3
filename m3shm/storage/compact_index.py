"""A compact in-memory label index for many series: interned label pairs, columns on demand.

:class:`CompactIndex` is what each worker keeps for the series in shared memory
(m3shm/storage/shm_index.py), where a million series are common and every worker holds its own
copy. It stores per series only the ids of its label pairs, and each distinct pair once:

    pairs        pair id -> (name, value), interned: one tuple and two strings per distinct
                 pair, found by the pair's canonical bytes (u16 name_len, name, u16 value_len,
                 value), so adding a series decodes no string it has seen before
    forward      the pair ids of every series back to back (uint32, 4 bytes per label), and
                 where each series' ids start (uint64 per series); ids are dense: 0, 1, 2, ...

A series' labels are rebuilt from its pair ids (``labels(i)``: the same tuple of (name, value)
pairs, sorted by name, that parsing its canonical bytes gives). The reverse index is derived:
the column of a label name (sorted values and CSR postings,
:class:`~m3shm.storage.index_column.LabelColumn`) is computed with numpy from the forward ids
the first time a query needs it after a series with that name was added, and kept until then.
Queries are :class:`~m3shm.storage.index_select.IndexReader`'s, so they answer exactly as the
dict-of-lists :class:`~m3shm.storage.reverse_index.ReverseIndex` (still used for the segments
persisted beside filesets) does; tests/test_compact_index.py checks both against a reference.

Memory: about 4 bytes per label + 8 per series, plus 4 per label for the columns once built,
against ~1-2 KB per series for Python tuples, strings and lists of ints. Not thread-safe: the
caller (ShmIndex) serialises adds and queries.
"""

from __future__ import annotations

from array import array

import numpy as np

from m3shm.storage import index_postings as P
from m3shm.storage.index_column import LabelColumn
from m3shm.storage.index_select import IndexReader

Labels = tuple[tuple[str, str], ...]


class CompactIndex(IndexReader):
    def __init__(self) -> None:
        self._pair_of: dict[bytes, int] = {}  # canonical pair bytes -> pair id
        self.pairs: list[tuple[str, str]] = []  # pair id -> (name, value)
        self._pair_name = array("I")  # pair id -> name id
        self._name_of: dict[str, int] = {}
        self._names: list[str] = []
        self._fwd = array("I")  # pair ids of series 0, 1, ... back to back
        self._start = array("Q", [0])  # series i's ids are _fwd[_start[i]:_start[i + 1]]
        self._columns: dict[str, LabelColumn] = {}
        self._dirty: set[int] = set()  # name ids whose column is stale
        self._all: P.Postings | None = None

    def __len__(self) -> int:
        return len(self._start) - 1

    def add_canonical(self, raw: bytes) -> int:
        """Index a series by its canonical label bytes; returns its id (the next dense one).

        Raises ValueError for bytes that are not a canonical label set's."""
        pair_of = self._pair_of
        ids = []
        i, n = 0, len(raw)
        while i < n:
            if i + 2 > n:
                raise ValueError("canonical labels: truncated name length")
            nl = raw[i] | raw[i + 1] << 8
            j = i + 2 + nl
            if j + 2 > n:
                raise ValueError("canonical labels: truncated label")
            end = j + 2 + (raw[j] | raw[j + 1] << 8)
            if end > n:
                raise ValueError("canonical labels: truncated value")
            key = raw[i:end]
            p = pair_of.get(key)
            if p is None:
                p = self._intern(key, raw[i + 2:j].decode(), raw[j + 2:end].decode())
            ids.append(p)
            i = end
        return self._append(ids)

    def add_labels(self, labels: Labels) -> int:
        """Index a series by its (name, value) pairs, sorted by name; returns its id."""
        ids = []
        for name, value in labels:
            nb, vb = name.encode(), value.encode()
            key = len(nb).to_bytes(2, "little") + nb + len(vb).to_bytes(2, "little") + vb
            p = self._pair_of.get(key)
            ids.append(self._intern(key, name, value) if p is None else p)
        return self._append(ids)

    def _append(self, ids: list[int]) -> int:
        self._fwd.extend(ids)
        pair_name = self._pair_name
        self._dirty.update(pair_name[p] for p in ids)
        self._start.append(len(self._fwd))
        self._all = None
        return len(self._start) - 2

    def _intern(self, key: bytes, name: str, value: str) -> int:
        k = self._name_of.get(name)
        if k is None:
            k = self._name_of[name] = len(self._names)
            self._names.append(name)
        name = self._names[k]  # one string object per name
        p = self._pair_of[key] = len(self.pairs)
        self.pairs.append((name, value))
        self._pair_name.append(k)
        return p

    def labels(self, i: int) -> Labels:
        """Series i's labels: (name, value) pairs sorted by name."""
        pairs = self.pairs
        return tuple(pairs[p] for p in self._fwd[self._start[i]:self._start[i + 1]])

    # -- IndexReader -------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._names)

    def all_postings(self) -> P.Postings:
        if self._all is None:
            self._all = np.arange(len(self), dtype=P.ID_DTYPE)
            self._all.setflags(write=False)
        return self._all

    def column(self, name: str) -> LabelColumn | None:
        k = self._name_of.get(name)
        if k is None:
            return None
        col = self._columns.get(name)
        if col is None or k in self._dirty:
            col = self._columns[name] = self._build(name, k)
            self._dirty.discard(k)
        return col

    def _build(self, name: str, k: int) -> LabelColumn:
        fwd = np.frombuffer(self._fwd, dtype=np.uint32)
        start = np.frombuffer(self._start, dtype=np.uint64)
        pair_name = np.frombuffer(self._pair_name, dtype=np.uint32)
        at = np.flatnonzero(pair_name[fwd] == k)  # entries of this name, in series order
        series = (np.searchsorted(start, at, side="right") - 1).astype(P.ID_DTYPE)
        pids = np.flatnonzero(pair_name == k)  # this name's pairs
        values = [self.pairs[p][1] for p in pids.tolist()]
        order = sorted(range(len(values)), key=values.__getitem__)
        rank = np.zeros(len(self.pairs), dtype=np.int64)
        rank[pids[order]] = np.arange(len(order))
        r = rank[fwd[at]]
        perm = np.argsort(r, kind="stable")  # by value, then series (already ascending)
        ids = series[perm]
        counts = np.bincount(r, minlength=len(order))
        keep = np.flatnonzero(counts)
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(counts[keep], out=offsets[1:])
        vals = [values[order[j]] for j in keep.tolist()]
        ids.setflags(write=False)  # postings of one value are handed out as views
        return LabelColumn(name, vals, offsets, ids, any("\n" in v for v in vals))
