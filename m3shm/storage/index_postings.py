"""Postings lists (sorted, duplicate-free uint32 arrays of series ids) and set algebra on them.

Every function takes and returns arrays in that form. The reverse index keeps each label as a
column in CSR form (see :class:`m3shm.storage.index_column.LabelColumn`): the postings of value
``i`` are ``ids[offsets[i]:offsets[i + 1]]``, so a run of adjacent values is one slice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

Postings = npt.NDArray[np.uint32]

ID_DTYPE = np.uint32
MAX_ID = 2**32 - 1
EMPTY: Postings = np.empty(0, dtype=ID_DTYPE)
EMPTY.setflags(write=False)


def as_postings(ids: npt.ArrayLike) -> Postings:
    """``ids`` as a sorted, duplicate-free uint32 array."""
    a = np.asarray(ids)
    if a.size and (a.min() < 0 or a.max() > MAX_ID):
        raise ValueError(f"series ids must be within 0..{MAX_ID}")
    return np.unique(a.astype(ID_DTYPE, copy=False))


def contains(haystack: Postings, needles: Postings) -> npt.NDArray[np.bool_]:
    """For each id of ``needles``, whether it is in ``haystack`` (both sorted)."""
    if not haystack.size or not needles.size:
        return np.zeros(needles.size, dtype=bool)
    pos = np.searchsorted(haystack, needles)
    pos[pos == haystack.size] = haystack.size - 1
    return haystack[pos] == needles


def intersect(a: Postings, b: Postings) -> Postings:
    """The ids in both ``a`` and ``b``."""
    if a.size > b.size:
        a, b = b, a
    if not a.size:
        return EMPTY
    if a.size * 4 < b.size:
        return a[contains(b, a)]
    return np.intersect1d(a, b, assume_unique=True).astype(ID_DTYPE, copy=False)


def subtract(a: Postings, b: Postings) -> Postings:
    """The ids of ``a`` that are not in ``b``."""
    if not a.size or not b.size:
        return a
    return a[~contains(b, a)]


def union_disjoint(parts: list[Postings]) -> Postings:
    """The union of postings lists that share no id (as the values of one label do)."""
    if not parts:
        return EMPTY
    if len(parts) == 1:
        return parts[0]
    out = np.concatenate(parts)
    out.sort(kind="stable")
    return out


def union(a: Postings, b: Postings) -> Postings:
    """The ids in ``a`` or ``b``."""
    if not a.size:
        return b
    if not b.size:
        return a
    return np.union1d(a, b).astype(ID_DTYPE, copy=False)


def gather(offsets: npt.NDArray[Any], ids: Postings,
           value_idx: npt.NDArray[np.int64]) -> Postings:
    """The union of the postings of the values ``value_idx`` (sorted, distinct) of a CSR column."""
    if not value_idx.size:
        return EMPTY
    starts = offsets[value_idx].astype(np.int64)
    ends = offsets[value_idx + 1].astype(np.int64)
    if value_idx.size == 1:
        return ids[starts[0]:ends[0]]  # one value's postings are sorted already
    if value_idx[-1] - value_idx[0] + 1 == value_idx.size:
        out = ids[starts[0]:ends[-1]].copy()
    else:
        lens = ends - starts
        total = int(lens.sum())
        if not total:
            return EMPTY
        # position k of the output reads ids[starts[j] + (k - first_k[j])] for its run j
        first_k = np.cumsum(lens) - lens
        pos = np.repeat(starts - first_k, lens) + np.arange(total, dtype=np.int64)
        out = ids[pos]
    out.sort()
    return out
