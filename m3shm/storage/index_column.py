"""One label of the reverse index as a column: sorted distinct values and their postings in CSR.

``values[i]`` is the i-th distinct value in code-point order (the same order as UTF-8 bytes, so
a segment's byte-sorted values bisect as strings); the series holding it are
``ids[offsets[i]:offsets[i + 1]]``, sorted. A series holds one value per label, so the postings
of different values never share an id, and the postings of a run of values is one slice.
The in-memory index and the segment reader both hand out columns; the select logic runs on them.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from m3shm.storage import index_postings as P
from m3shm.storage.index_matchers import IndexMatcher

SCAN_CACHE = 64  # regex scan results kept per column


class LabelColumn:
    def __init__(self, name: str, values: Sequence[str], offsets: npt.NDArray[Any],
                 ids: P.Postings, has_newline: bool) -> None:
        self.name = name
        self.values = values
        self.offsets = offsets
        self.ids = ids
        self.has_newline = has_newline  # some value holds "\n", which "." does not match
        self._all: P.Postings | None = None
        self._list: list[str] | None = None
        # regex scans by (pattern, range); a column never changes, so they stay valid
        self._scans: dict[tuple[str, int, int], npt.NDArray[np.int64]] = {}

    def __len__(self) -> int:
        return len(self.values)

    def value_list(self) -> list[str]:
        """Every value as a list (materialised once, for regex scans)."""
        if self._list is None:
            self._list = list(self.values)
        return self._list

    def find(self, value: str) -> int:
        i = bisect.bisect_left(self.values, value)
        return i if i < len(self.values) and self.values[i] == value else -1

    def prefix_range(self, prefix: str) -> tuple[int, int]:
        """The index range of the values that start with ``prefix``."""
        if not prefix:
            return 0, len(self.values)
        lo = bisect.bisect_left(self.values, prefix)
        last = ord(prefix[-1])
        if last == 0x10FFFF:
            hi = lo
            while hi < len(self.values) and self.values[hi].startswith(prefix):
                hi += 1
            return lo, hi
        upper = prefix[:-1] + chr(last + 1)
        return lo, bisect.bisect_left(self.values, upper, lo)

    def all_postings(self) -> P.Postings:
        """Every series that has this label."""
        if self._all is None:
            a = self.ids.copy()
            a.sort()
            self._all = a
        return self._all

    def postings_of(self, value_idx: npt.NDArray[np.int64]) -> P.Postings:
        return P.gather(self.offsets, self.ids, value_idx)

    def base_indices(self, m: IndexMatcher) -> npt.NDArray[np.int64]:
        """Sorted indices of the values for which ``m``'s predicate holds, before negation."""
        if m.regex is None:
            i = self.find(m.value)
            return np.array([i] if i >= 0 else [], dtype=np.int64)
        plan = m.plan
        assert plan is not None
        if plan.literals is not None:
            found = {self.find(v) for v in plan.literals} - {-1}
            return np.array(sorted(found), dtype=np.int64)
        lo, hi = self.prefix_range(plan.prefix)
        if plan.dot_star_rest and not self.has_newline:
            return np.arange(lo, hi, dtype=np.int64)
        key = (m.value, lo, hi)
        hit = self._scans.get(key)
        if hit is None:
            match = m.regex.fullmatch
            vals = self.value_list()
            hit = np.array([i for i in range(lo, hi) if match(vals[i]) is not None],
                           dtype=np.int64)
            if len(self._scans) >= SCAN_CACHE:
                self._scans.pop(next(iter(self._scans)))
            self._scans[key] = hit
        return hit

    def matching_indices(self, m: IndexMatcher, want: bool) -> npt.NDArray[np.int64]:
        """Indices of the values where ``m.matches(value) == want``."""
        base = self.base_indices(m)
        if m.negated == want:  # we want the values where the base predicate fails
            mask = np.ones(len(self.values), dtype=bool)
            mask[base] = False
            return np.flatnonzero(mask).astype(np.int64, copy=False)
        return base

    def value_indices_in(self, postings: P.Postings) -> npt.NDArray[np.int64]:
        """Indices of the values held by at least one series of ``postings``."""
        hit = P.contains(postings, self.ids)
        if not hit.any():
            return np.empty(0, dtype=np.int64)
        pos = np.flatnonzero(hit)
        return np.unique(np.searchsorted(self.offsets, pos, side="right") - 1)
