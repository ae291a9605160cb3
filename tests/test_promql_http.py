"""The PromQL script suite (tests/promql/*.test) through the daemon's HTTP API.

Each script block's series are remote-written into one real daemon, each block shifted to its
own day (so blocks never see each other's data; shifts are whole days, so step and subquery
alignment is unchanged), then every eval runs as an HTTP instant or range query and is
checked exactly as the in-memory suite checks it. Cases that read absolute time (time(),
timestamp(), @, calendar functions) are left to the in-memory suite."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import snappy
from test_daemon_harness import Daemon, now_ms, write_request
from test_promql_scripts import CASES

from m3shm.query.engine import Result, Sample, Series
from m3shm.query.errors import QueryError
from m3shm.query.script import Case, check_case

DAY = 86_400_000
ABSOLUTE_TIME = re.compile(r"time\(\)|timestamp|@|day_of|days_in|hour|minute|month|year")
HTTP_CASES = [c for c in CASES if not ABSOLUTE_TIME.search(c.expr)]
GROUPS = list({id(c.loads): c.loads for c in HTTP_CASES}.values())


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("promqlhttp"), series=8192, arena="8MiB", extra="""
namespaces:
  - {name: default, retention: 20d, blockSize: 16d, bufferPast: 10d, bufferFuture: 2m}
""").start()
    base = (now_ms() - 3 * 3_600_000) // DAY * DAY
    offsets = {}
    for k, loads in enumerate(GROUPS):
        off = base - k * DAY
        offsets[id(loads)] = off
        merged: dict = {}
        for load in loads:
            for labels, vals in load.series:
                pts = merged.setdefault(labels, {})
                for i, v in enumerate(vals):
                    if v is not None:
                        pts[off + i * load.interval_ms] = v
        series = [(list(lb), sorted(pts.items())) for lb, pts in merged.items()]
        for i in range(0, len(series), 500):
            code, body, _ = d.post("/api/v1/write",
                                   snappy.compress(write_request(series[i:i + 500])))
            assert code == 204, body
    yield d, offsets
    d.stop()


class HttpEngine:
    """The Engine interface check_case uses, answered by the daemon over HTTP."""

    def __init__(self, d: Daemon, off: int) -> None:
        self.d, self.off = d, off

    def _get(self, path: str, **params) -> dict:
        url = self.d.url + path + "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                return json.load(r)["data"]
        except urllib.error.HTTPError as e:
            raise QueryError(json.loads(e.read())["error"]) from None

    def instant(self, expr: str, t: int) -> Result:
        data = self._get("/api/v1/query", query=expr, time=(t + self.off) / 1000)
        kind, res = data["resultType"], data["result"]
        if kind == "scalar":
            return Result("scalar", scalar=(t, float(res[1])))
        if kind == "string":
            return Result("string", string=(t, res[1]))
        if kind == "vector":
            return Result("vector", vector=[Sample(tuple(sorted(s["metric"].items())), t,
                                                   float(s["value"][1])) for s in res])
        return Result("matrix", matrix=self._matrix(res))

    def range(self, expr: str, start: int, end: int, step: int) -> Result:
        data = self._get("/api/v1/query_range", query=expr, start=(start + self.off) / 1000,
                         end=(end + self.off) / 1000, step=step / 1000)
        return Result("matrix", matrix=self._matrix(data["result"]))

    def _matrix(self, res: list) -> list[Series]:
        out = []
        for s in res:
            ts = np.array([round(float(p[0]) * 1000) - self.off for p in s["values"]], np.int64)
            vs = np.array([float(p[1]) for p in s["values"]], np.float64)
            out.append(Series(tuple(sorted(s["metric"].items())), ts, vs))
        return out


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.name for c in HTTP_CASES])
def test_script_case_over_http(daemon, case: Case) -> None:
    d, offsets = daemon
    problems = check_case(case, HttpEngine(d, offsets[id(case.loads)]))  # type: ignore[arg-type]
    assert not problems, f"{case.path}:{case.line}: {case.expr}\n  " + "\n  ".join(problems)


def test_most_cases_run_over_http() -> None:
    assert len(HTTP_CASES) >= 0.9 * len(CASES)
