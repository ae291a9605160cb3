"""The queries of a reverse index, on top of whatever hands out its label columns.

:class:`IndexReader` answers ``select``, ``label_names`` and ``label_values`` from three
primitives a subclass provides (``column``, ``names``, ``all_postings``); the in-memory index and
the segment reader share this code, so they answer the same queries the same way.

``select`` resolves each matcher to postings with set algebra over columns, never per series:
a matcher that does not match the empty string contributes the postings of the values it
matches (intersected); one that does match the empty string also selects series lacking the
label, so it contributes the postings of the values it rejects (subtracted).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import numpy as np

from m3shm.storage import index_postings as P
from m3shm.storage.index_column import LabelColumn
from m3shm.storage.index_matchers import to_index_matcher


class IndexReader(ABC):
    @abstractmethod
    def column(self, name: str) -> LabelColumn | None:
        """The column of label ``name``, or None when no series has it."""

    @abstractmethod
    def names(self) -> list[str]:
        """Every label name held, sorted."""

    @abstractmethod
    def all_postings(self) -> P.Postings:
        """Every series id held, sorted."""

    def select(self, matchers: Iterable[Any]) -> P.Postings:
        """The sorted ids of the series that every matcher selects.

        Raises ValueError when no matcher rejects the empty string (such a selector would select
        every series, which Prometheus refuses), or for a bad operator or regex.
        """
        ms = [to_index_matcher(m) for m in matchers]
        if not any(not m.matches_empty for m in ms):
            shown = "{" + ", ".join(str(m) for m in ms) + "}"
            raise ValueError(f"selector {shown} needs at least one matcher that does not "
                             "match the empty string")
        keep: list[P.Postings] = []
        drop: list[P.Postings] = []
        for m in ms:
            col = self.column(m.name)
            if m.matches_empty:
                if col is not None:
                    drop.append(col.postings_of(col.matching_indices(m, want=False)))
            elif col is None:
                return P.EMPTY
            else:
                keep.append(col.postings_of(col.matching_indices(m, want=True)))
        keep.sort(key=len)
        out = keep[0]
        for k in keep[1:]:
            if not out.size:
                break
            out = P.intersect(out, k)
        for d in drop:
            out = P.subtract(out, d)
        return out

    def label_names(self, postings: P.Postings | None = None) -> list[str]:
        """Every label name, or only those held by at least one series of ``postings``."""
        if postings is None:
            return self.names()
        out = []
        for name in self.names():
            col = self.column(name)
            if col is not None and P.contains(postings, col.ids).any():
                out.append(name)
        return out

    def label_values(self, name: str, postings: P.Postings | None = None) -> list[str]:
        """The sorted distinct values of ``name``, or only those held within ``postings``."""
        col = self.column(name)
        if col is None:
            return []
        if postings is None:
            return list(col.values)
        vals = col.value_list()
        return [vals[i] for i in col.value_indices_in(np.asarray(postings, dtype=P.ID_DTYPE))]
