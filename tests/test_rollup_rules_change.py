"""Rollup rules changed under load (issue 8): PUT /api/v1/rules adds a rollup rule, changes
one (its filter), removes one and keeps one, while 50 instances' counters (with resets) are
written; half the instances lag 1.5 s behind the wall clock (samples stamped before the
activation arrive after it).

Every window of every rolled-up counter must equal the raw increases of the instances that
the rule version active for that window selects (relative 1e-9): windows ending at or before
the activation under the old rules, later ones under the new. The unchanged rule's counter
goes on across the activation without losing the increment from each instance's last sample
before the activation to its first after (its series' plans changed: another rule did); the
added rule's counter starts with that increment; the changed rule's group keeps its series,
counts only the instances its new filter selects from the activation on (one instance before,
all of the service's after), and its counter goes on from the old version's total (the new
group cell's Add continues from the old one's); the removed rule's group simply stops at the
activation. Admission and forward delay are 6 s, as in tests/test_rollup_daemon.py: on the
shared machine a stalled worker must not make values late.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_daemon_harness import Daemon, now_ms
from tests.test_rollup_daemon import Counters, write_until_ok

RES_MS = 1000
INSTANCES = 50
STEP_MS = 250
LAG_MS = 1500
SERVICES = ("api", "web")
ENDPOINTS = ("/a", "/b")


def rule(name: str, flt: str, metric: str, by: list[str]) -> dict:
    return {"name": name, "filter": flt, "storagePolicies": ["1s:2d"],
            "transforms": [{"transform": {"type": "Increase"}},
                           {"rollup": {"metricName": metric, "groupBy": by,
                                       "aggregations": ["Sum"]}},
                           {"transform": {"type": "Add"}}]}


KEPT = rule("by endpoint", "__name__:http_requests_total", "req_by_endpoint_total",
            ["service", "endpoint"])
# the changed rule first selects one instance per service, then all of them: its total before
# the activation is below the first window's increase after it, so a counter restarting at
# zero there would not even read as a reset (rate() would lose the old total silently)
CHANGED_V1 = rule("by service", "__name__:http_requests_total instance:10.0.0.[01]:9100",
                  "req_by_service_total", ["service"])
V1_SERVICE_INSTANCES = ("10.0.0.0:9100", "10.0.0.1:9100")
CHANGED_V2 = rule("by service", "__name__:http_requests_total", "req_by_service_total",
                  ["service"])
REMOVED = rule("by job", "__name__:http_requests_total", "req_by_job_total", ["job"])
ADDED = rule("by path", "__name__:http_requests_total", "req_by_path_total", ["endpoint"])

V1 = {"defaultPolicies": [], "rollupRules": [KEPT, CHANGED_V1, REMOVED]}
V2 = {"defaultPolicies": [], "rollupRules": [KEPT, CHANGED_V2, ADDED]}

CONFIG = """
namespaces:
  - {name: default, retention: 2h, blockSize: 1h, bufferPast: 6s, bufferFuture: 1s}
downsample:
  admission: 6s
  forward_delay: 6s
  rules:
""" + "\n".join("    " + ln for ln in json.dumps(V1).splitlines())

Labels = dict[str, str]


def instance_labels(i: int) -> Labels:
    return {"__name__": "http_requests_total", "service": SERVICES[i % 2],
            "endpoint": ENDPOINTS[(i // 2) % 2], "instance": f"10.0.0.{i}:9100",
            "job": "app"}


# what each rolled-up series of a version sums: (metric, group labels) -> instance filter
Selects = dict[tuple[str, tuple], Callable[[Labels], bool]]


def groups(version: int) -> Selects:
    out: Selects = {}
    for i in range(INSTANCES):
        lb = instance_labels(i)
        rules = [("req_by_endpoint_total", ("service", "endpoint"), True)]
        if version == 1:
            rules += [("req_by_service_total", ("service",),
                       lb["instance"] in V1_SERVICE_INSTANCES),
                      ("req_by_job_total", ("job",), True)]
        else:
            rules += [("req_by_service_total", ("service",), True),
                      ("req_by_path_total", ("endpoint",), True)]
        for metric, by, selected in rules:
            if not selected:
                continue
            key = (metric, tuple(sorted((k, lb[k]) for k in by)))
            if key not in out:
                want = dict(key[1])
                only = V1_SERVICE_INSTANCES if (
                    version == 1 and metric == "req_by_service_total") else None
                out[key] = (lambda x, want=want, only=only:
                            all(x[k] == v for k, v in want.items()) and
                            (only is None or x["instance"] in only))
    return out


def rolled_up(d: Daemon, at_ms: int) -> dict[tuple[str, tuple], dict[int, float]]:
    q = urllib.parse.urlencode({"query": '{__name__=~"req_by_.*"}[1h]',
                                "time": f"{at_ms / 1000:.3f}"})
    code, body = d.get(f"/api/v1/query?{q}")
    assert code == 200, body
    out = {}
    for r in json.loads(body)["data"]["result"]:
        m = dict(r["metric"])
        name = m.pop("__name__")
        out[(name, tuple(sorted(m.items())))] = {round(float(t) * 1000): float(v)
                                                  for t, v in r["values"]}
    return out


def put_rules(d: Daemon, rules: dict) -> int:
    req = urllib.request.Request(d.url + "/api/v1/rules", data=json.dumps(rules).encode(),
                                 method="PUT", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return int(json.loads(r.read())["data"]["activation_ms"])


def test_rollup_rules_change_under_load(tmp_path: Path) -> None:
    d = Daemon(tmp_path, workers=2, series=4096, arena="4MiB", extra=CONFIG).start()
    counters = Counters(seed=5, labels=instance_labels, lag_ms=LAG_MS)
    deadline = time.monotonic() + 120
    try:
        ts = now_ms()
        t_first = ts - LAG_MS
        act = 0
        k = 0
        while not act or ts < act + LAG_MS + 3 * RES_MS:
            ts = max(ts + STEP_MS, now_ms())
            while now_ms() < ts:
                time.sleep(0.005)
            write_until_ok(d, counters.step(ts), deadline)
            k += 1
            if k == 8:
                act = put_rules(d, V2)
                assert act % RES_MS == 0 and act > ts
        last_end = (ts - LAG_MS) // RES_MS * RES_MS
        v1, v2 = groups(1), groups(2)
        got: dict = {}
        while time.monotonic() < deadline:
            got = rolled_up(d, now_ms())
            if set(got) == set(v1) | set(v2) and all(
                    max(got[g]) >= last_end for g in v2):
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"rolled-up series incomplete: {sorted(got)}\n{d.logtext()}")
        page = d.get("/metrics")[1].decode()
        info = [ln for ln in page.splitlines() if ln.startswith(
            ("m3shm_rollup", "m3shm_downsample_late", "m3shm_downsample_out_of_order"))]
        first_end = (t_first // RES_MS + 1) * RES_MS
        wrong = {}
        for g, pts in got.items():
            ends = sorted(pts)
            assert all(t % RES_MS == 0 for t in ends), (g, ends)
            # the windows each version's rule writes: consecutive, none missing
            lo = first_end if g in v1 else act + RES_MS
            hi = act if g not in v2 else last_end
            assert ends[0] <= lo + 3 * RES_MS and ends[-1] >= hi, (g, ends, act)
            assert ends == list(range(ends[0], ends[-1] + 1, RES_MS)), (g, ends)
            if g not in v2:
                assert ends[-1] == act, ("a removed rule's group stops", g, ends, act)
            if g not in v1:
                assert ends[0] == act + RES_MS, ("an added rule starts after", g, ends, act)
            bad = []
            prev = None
            for e in ends:
                sel = (v1 if e <= act else v2)[g]
                if prev is None:
                    # the counter starts at the increases up to its first window end
                    t0 = act if g not in v1 else 0
                    want, have = counters.increase(sel, t0, e), pts[e]
                else:
                    # a changed rule's counter too goes on across the activation: its new
                    # group cell's Add continues from the old cell's total
                    want, have = counters.increase(sel, prev, e), pts[e] - pts[prev]
                if have != pytest.approx(want, rel=1e-9, abs=1e-9):
                    bad.append((e, have, want))
                prev = e
            if g[0] == "req_by_service_total" and act + RES_MS in pts:
                # the case above: the old total is below the first new window's increase
                assert counters.increase(v2[g], act, act + RES_MS) > pts[act], (g, act)
            if bad:
                wrong[g] = bad
        assert not wrong, ("activation", act, "windows (end, have, want):", wrong, info)
        assert 'm3shm_downsample_late_samples_total 0' in page, info
        assert 'm3shm_rollup_late_values_total{namespace="agg_1s_2d"} 0' in page, info
        assert 'm3shm_rollup_records_unmatched_total{namespace="agg_1s_2d"} 0' in page, info
    finally:
        d.stop()
