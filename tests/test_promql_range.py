"""Range evaluation agrees with instant evaluation at every step.

The engine evaluates a range query as one pass over (series x steps) matrices; an instant
query is the one-step case. For every instant case of the scripts, a range query around its
time must give, at each step, exactly what an instant query at that step gives.
"""

from __future__ import annotations

import math

import pytest
from test_promql_scripts import CASES

from m3shm.query.engine import Engine
from m3shm.query.errors import QueryError
from m3shm.query.script import Case, almost_equal, build_store

STEP_MS = 70_000  # deliberately not a multiple of any load interval
STEPS = 7

RANGE_CASES = [c for c in CASES if not c.fail and not c.is_range and "@ start()" not in c.expr
               and "@ end()" not in c.expr]


def _instant(engine: Engine, expr: str, t: int) -> dict:
    res = engine.instant(expr, t)
    if res.type == "scalar":
        assert res.scalar is not None
        return {(): res.scalar[1]}
    assert res.type == "vector"
    return {s.labels: s.v for s in res.vector}


@pytest.mark.parametrize("case", RANGE_CASES, ids=[c.name for c in RANGE_CASES])
def test_range_matches_instant(case: Case) -> None:
    engine = Engine(build_store(case.loads))
    start = max(0, case.start - 3 * STEP_MS)
    end = start + (STEPS - 1) * STEP_MS
    try:
        want = [_instant(engine, case.expr, start + i * STEP_MS) for i in range(STEPS)]
    except QueryError:
        with pytest.raises(QueryError):
            engine.range(case.expr, start, end, STEP_MS)
        return
    got: list[dict] = [{} for _ in range(STEPS)]
    for s in engine.range(case.expr, start, end, STEP_MS).matrix:
        for t, v in zip(s.ts.tolist(), s.values.tolist(), strict=True):
            got[(t - start) // STEP_MS][s.labels] = v
    for i in range(STEPS):
        assert got[i].keys() == want[i].keys(), f"step {i}: series differ"
        for k, v in want[i].items():
            assert almost_equal(got[i][k], v) or (math.isnan(v) and math.isnan(got[i][k])), \
                f"step {i} {k}: range {got[i][k]} != instant {v}"
