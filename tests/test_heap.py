"""m3shm/heap.py: glibc's malloc_trim, at most once per MIN_INTERVAL_S unless forced."""

from __future__ import annotations

import pytest

from m3shm import heap

pytestmark = pytest.mark.skipif(heap._fn is None, reason="not glibc")


def test_trim_is_rate_limited() -> None:
    assert heap.trim(force=True)
    assert not heap.trim()  # within MIN_INTERVAL_S of the last one
    assert heap.trim(force=True)
