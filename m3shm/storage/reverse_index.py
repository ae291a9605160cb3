"""The reverse index of one shard's index block: label name -> label value -> postings.

:class:`ReverseIndex` is the mutable in-memory index of an open block. Series are added with a
dense integer id (at most 2^32 - 1) and their label set; queries (``select``, ``label_names``,
``label_values``, from :class:`~m3shm.storage.index_select.IndexReader`) see every series added
before them. At flush, :func:`~m3shm.storage.index_segment.write_segment` persists it as an
immutable segment, which :class:`~m3shm.storage.index_segment.SegmentReader` answers the same
queries from through mmap. Format: ``docs/formats/index.md``.

Adding a series touches one dict entry per label. A label's column (sorted values and CSR
postings, see :mod:`m3shm.storage.index_column`) is built the first time a query needs it after
that label changed, so a burst of new series costs one rebuild per touched label.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import chain

import numpy as np

from m3shm.storage import index_postings as P
from m3shm.storage.index_column import LabelColumn
from m3shm.storage.index_select import IndexReader

LabelSet = Mapping[str, str] | Iterable[tuple[str, str]]

__all__ = ["LabelSet", "ReverseIndex"]


class ReverseIndex(IndexReader):
    """The in-memory reverse index: add series, then query them."""

    def __init__(self) -> None:
        self._labels: dict[str, dict[str, list[int]]] = {}
        self._present = bytearray()
        self._count = 0
        self._max_id = -1
        self._ordered = True  # ids were added in increasing order, so every list is sorted
        self._columns: dict[str, LabelColumn] = {}
        self._all: P.Postings | None = None

    def __len__(self) -> int:
        return self._count

    def add(self, series_id: int, labels: LabelSet) -> None:
        """Index series ``series_id`` with ``labels``; empty values are dropped (absent labels).

        Raises ValueError for an id out of range or already added.
        """
        if not 0 <= series_id <= P.MAX_ID:
            raise ValueError(f"series id {series_id} outside 0..{P.MAX_ID}")
        if series_id < len(self._present) and self._present[series_id]:
            raise ValueError(f"series id {series_id} is already indexed")
        pairs = labels.items() if isinstance(labels, Mapping) else labels
        uniq = dict(pairs)
        if series_id >= len(self._present):
            self._present.extend(bytes(max(series_id + 1 - len(self._present),
                                           len(self._present))))
        self._present[series_id] = 1
        self._count += 1
        if series_id < self._max_id:
            self._ordered = False
        else:
            self._max_id = series_id
        self._all = None
        cols = self._columns
        for name, value in uniq.items():
            if value == "":
                continue
            by_value = self._labels.get(name)
            if by_value is None:
                by_value = self._labels[name] = {}
            ids = by_value.get(value)
            if ids is None:
                by_value[value] = [series_id]
            else:
                ids.append(series_id)
            if name in cols:
                del cols[name]

    def names(self) -> list[str]:
        return sorted(self._labels)

    def all_postings(self) -> P.Postings:
        if self._all is None:
            present = np.frombuffer(self._present, dtype=np.uint8)
            self._all = np.flatnonzero(present).astype(P.ID_DTYPE)
        return self._all

    def column(self, name: str) -> LabelColumn | None:
        col = self._columns.get(name)
        if col is None:
            by_value = self._labels.get(name)
            if by_value is None:
                return None
            col = self._columns[name] = self._build(name, by_value)
        return col

    def _build(self, name: str, by_value: dict[str, list[int]]) -> LabelColumn:
        values = sorted(by_value)
        lists = [by_value[v] for v in values]
        lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        offsets = np.zeros(len(values) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        ids = np.fromiter(chain.from_iterable(lists), dtype=P.ID_DTYPE, count=int(offsets[-1]))
        if not self._ordered:
            run = np.repeat(np.arange(len(values)), lens)
            ids = ids[np.lexsort((ids, run))]
        ids.setflags(write=False)  # postings of one value are handed out as views
        has_newline = any("\n" in v for v in values)
        return LabelColumn(name, values, offsets, ids, has_newline)
