"""Engine API edges: limits, errors, lookback, result types and stats."""

from __future__ import annotations

import numpy as np
import pytest

from m3shm.query.engine import Engine, Limits
from m3shm.query.errors import QueryError, QueryLimitError
from m3shm.query.storage import MemoryStore


@pytest.fixture
def store() -> MemoryStore:
    s = MemoryStore()
    ts = np.arange(0, 600_000, 15_000, dtype=np.int64)
    for i in range(10):
        s.add({"__name__": "x", "i": str(i)}, ts, np.arange(len(ts), dtype=np.float64))
    return s


def test_max_samples_stops_the_query(store: MemoryStore) -> None:
    with pytest.raises(QueryLimitError):
        Engine(store, limits=Limits(max_samples=100)).instant("sum_over_time(x[10m])", 600_000)
    res = Engine(store, limits=Limits(max_samples=10_000)).instant("sum(x)", 600_000)
    assert res.stats.samples_decoded > 0 and res.stats.series_selected == 10


def test_max_series_stops_the_query(store: MemoryStore) -> None:
    with pytest.raises(QueryLimitError):
        Engine(store, limits=Limits(max_series=5)).instant("x", 300_000)


def test_errors_are_query_errors(store: MemoryStore) -> None:
    e = Engine(store)
    for bad in ["sum(", "x[5m] + 1", 'label_replace(x, "a-b", "", "i", ".*")']:
        with pytest.raises(QueryError):
            e.instant(bad, 0)
    with pytest.raises(QueryError):
        e.range("x", 10, 0, 1000)
    with pytest.raises(QueryError):
        e.range("x", 0, 10, 0)
    with pytest.raises(QueryError):
        e.range("x[5m]", 0, 10, 1)


def test_lookback_is_configurable(store: MemoryStore) -> None:
    assert len(Engine(store).instant("x", 700_000).vector) == 10
    assert len(Engine(store, lookback_ms=60_000).instant("x", 700_000).vector) == 0


def test_result_types(store: MemoryStore) -> None:
    e = Engine(store)
    assert e.instant("1 + 1", 0).scalar == (0, 2.0)
    assert e.instant('"hello"', 0).string == (0, "hello")
    m = e.instant('x{i="1"}[1m]', 60_000)
    assert m.type == "matrix" and list(m.matrix[0].ts) == [0, 15_000, 30_000, 45_000, 60_000]
    r = e.range("time()", 0, 120_000, 60_000)
    assert r.type == "matrix" and list(r.matrix[0].values) == [0.0, 60.0, 120.0]


def test_holt_winters_name_is_accepted_outside_strings(store: MemoryStore) -> None:
    e = Engine(store)
    a = e.instant("holt_winters(x[5m], 0.5, 0.5)", 300_000)
    b = e.instant("double_exponential_smoothing(x[5m], 0.5, 0.5)", 300_000)
    assert [s.v for s in a.vector] == [s.v for s in b.vector] and len(a.vector) == 10
    assert e.instant('x{i="holt_winters("}', 300_000).vector == []
