"""Rules that change live, end to end: GET/PUT /api/v1/rules, SIGHUP, <data>/rules.json across
restarts, and every worker learning the same version and activation time (each worker answers
GET with what it installed; X-M3shm-Worker names it)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from rules_config import rules_config, short_raw
from test_daemon_harness import Daemon, now_ms

from m3shm.rules import versions


# short windows: admission 1 s + bufferFuture 1 s, resolutions of 1 s and 2 s; the aggregated
# namespaces agg_1s_2h and agg_2s_2h are derived from the rules' policies
def live_config(admission: str = "1s", default_policies: tuple[str, ...] = ("1s:2h",)) -> str:
    return rules_config({"name": "keep2s", "filter": "__name__:never_written",
                         "storagePolicies": ["2s:2h"]}, default_policies=list(default_policies),
                        admission=admission, raw=short_raw("2h", "1h", "2s", "1s"))


EXTRA = live_config()
RULES_V2 = {"mappingRules": [{"name": "up at 2s", "filter": "__name__:up job:{api,web}",
                              "aggregations": ["Max", "Last"], "storagePolicies": ["2s:2h"]}],
            "defaultPolicies": ["1s:2h"]}


def _call(d: Daemon, method: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict, dict[str, str]]:
    req = urllib.request.Request(d.url + "/api/v1/rules", data=body, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _put_json(d: Daemon, doc: object, **headers: str) -> tuple[int, dict, dict[str, str]]:
    return _call(d, "PUT", json.dumps(doc).encode(),
                 {"Content-Type": "application/json", **headers})


def _views(d: Daemon, version: int, nworkers: int = 2, timeout: float = 20) -> dict[int, dict]:
    """GET on fresh connections until every worker has answered with ``version``: each
    worker's answer (SO_REUSEPORT spreads new connections over the workers)."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < nworkers:
        assert time.monotonic() < deadline, f"workers at {version}: {sorted(seen)}"
        try:
            code, doc, h = _call(d, "GET")
        except (ConnectionError, http.client.RemoteDisconnected):
            continue  # a SIGKILLed worker's queued connection

        assert code == 200, doc
        w = int(h["X-M3shm-Worker"])
        assert doc["data"]["worker"] == w and h["ETag"] == f'"{doc["data"]["version"]}"'
        if doc["data"]["version"] == version:
            seen[w] = doc["data"]
    return seen


def _same(views: dict[int, dict]) -> dict:
    """Every worker's view agrees on the version, activation and rules; one of them."""
    keys = ("version", "activation_ms", "source", "rules", "policies", "updated_ms")
    first = next(iter(views.values()))
    for v in views.values():
        assert {k: v[k] for k in keys} == {k: first[k] for k in keys}
    return first


def _metric(d: Daemon, name: str) -> float:
    for line in d.get("/metrics")[1].decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_put_switches_every_worker_at_the_same_boundary(tmp_path: Path) -> None:
    d = Daemon(tmp_path, extra=EXTRA).start()
    try:
        v1 = _same(_views(d, 1))
        assert v1["source"] == "config" and v1["activation_ms"] == 0 and v1["active"]
        assert [p["namespace"] for p in v1["policies"]] == ["agg_1s_2h", "agg_2s_2h"]
        t0 = int(time.time() * 1000)
        code, doc, h = _put_json(d, RULES_V2)
        t1 = int(time.time() * 1000)
        assert code == 200, doc
        put = doc["data"]
        assert put["version"] == 2 and put["source"] == "api"
        assert put["worker"] == int(h["X-M3shm-Worker"])
        # the next 2 s boundary (1 s and 2 s windows) after now + admission + bufferFuture
        act = put["activation_ms"]
        assert act % 2000 == 0 and t0 + 2000 < act <= t1 + 2000 + 2000
        views = _views(d, 2)
        v2 = _same(views)
        assert v2["activation_ms"] == act and v2["rules"] == put["rules"]
        assert v2["rules"]["mappingRules"][0]["filter"] == "__name__:up job:{api,web}"
        assert [(p["policy"], p["namespace"], p["rules"]) for p in v2["policies"]] == [
            ("1s:2h", "agg_1s_2h", ["default"]), ("2s:2h", "agg_2s_2h", ["up at 2s"])]
        assert _metric(d, "m3shm_rules_version") == 2
        assert _metric(d, "m3shm_rules_activation_timestamp_seconds") == act / 1000
        assert _metric(d, "m3shm_rules_changes_total") == 1
        page = d.get("/metrics")[1].decode()
        assert 'm3shm_rules_worker_version{worker="0"} 2' in page
        assert 'm3shm_rules_worker_version{worker="1"} 2' in page
        # before the activation the old version is in force, after it the new one
        while int(time.time() * 1000) <= act + 50:
            time.sleep(0.1)
        after = _same(_views(d, 2))
        assert after["active"] and after["in_force_version"] == 2 and after["pending"] == []
        on_disk = versions.load(d.data)
        assert on_disk is not None and on_disk.newest.activation_ms == act
    finally:
        assert d.stop() == 0, d.logtext()


def test_put_refuses_bad_rules_with_the_config_error(tmp_path: Path) -> None:
    d = Daemon(tmp_path, extra=EXTRA).start()
    try:
        bad = {"mappingRules": [{"filter": "__name__:up dev:sd[", "storagePolicies": ["1s:2h"]}]}
        code, doc, _ = _put_json(d, bad)
        assert code == 400 and doc["errorType"] == "bad_data"
        assert doc["error"] == ("downsample.rules.mappingRules[0].filter: term 'dev:sd[': "
                                "pattern 'sd[': '[' is never closed at position 2")
        code, doc, _ = _put_json(d, {"mappingRules": [{"filter": "a:b", "aggregations": ["P42"],
                                                       "storagePolicies": ["1s:2h"]}]})
        assert code == 400 and doc["error"].startswith(
            "downsample.rules.mappingRules[0].aggregations[0]: unknown aggregation 'P42'")
        code, doc, _ = _put_json(d, {"rollupRules": [{"filter": "a:b", "storagePolicies":
                                                      ["1h:5y"], "transforms": [{"rollup": {
                                                          "metricName": "x", "groupBy": ["a"]}}]}],
                                     "defaultPolicies": ["1s:2h"]})
        assert code == 400 and doc["error"].startswith(
            "downsample.rules.rollupRules[0].storagePolicies[0]: storage policy 1h:5y writes to "
            "namespace 'agg_1h_5y', which the running daemon does not have; a new namespace "
            "needs a restart")
        code, doc, _ = _put_json(d, {"mappingRules": []})   # the default default: 1m:30d
        assert code == 400 and "defaultPolicies[0]: storage policy 1m:30d" in doc["error"]
        code, doc, _ = _call(d, "PUT", b"mappingRules: [", {"Content-Type": "application/yaml"})
        assert code == 400 and doc["error"].startswith("downsample.rules: not valid YAML")
        code, doc, _ = _put_json(d, RULES_V2, **{"If-Match": "x"})
        assert code == 400 and "If-Match" in doc["error"]
        # nothing above made a version
        assert _same(_views(d, 1))["version"] == 1
        # If-Match: the newest version or 409
        code, doc, _ = _put_json(d, RULES_V2, **{"If-Match": '"2"'})
        assert code == 409 and doc["errorType"] == "conflict"
        assert "version 2 is not the newest; the rules are at version 1" in doc["error"]
        code, doc, _ = _put_json(d, RULES_V2, **{"If-Match": '"1"'})
        assert code == 200 and doc["data"]["version"] == 2
        code, doc, _ = _put_json(d, RULES_V2, **{"If-Match": "1"})
        assert code == 409
        # YAML, as a config file's downsample section
        yml = (b"downsample:\n  rules:\n    defaultPolicies: [2s:2h]\n    mappingRules:\n"
               b"      - {name: drop debug, filter: '__name__:*_debug', drop: true}\n")
        code, doc, _ = _call(d, "PUT", yml, {"Content-Type": "application/yaml",
                                             "If-Match": "2"})
        assert code == 200, doc
        v3 = _same(_views(d, 3))
        assert v3["rules"]["mappingRules"] == [{"name": "drop debug",
                                                "filter": "__name__:*_debug", "drop": True}]
        assert v3["activation_ms"] >= doc["data"]["activation_ms"] > 0
        assert _call(d, "POST", b"{}")[0] == 405
    finally:
        assert d.stop() == 0, d.logtext()


def _sighup(d: Daemon, marker: str, timeout: float = 20) -> None:
    before = d.log.read_text().count(marker)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while d.log.read_text().count(marker) == before:
        assert time.monotonic() < deadline, f"no {marker!r} in the log:\n{d.logtext()}"
        time.sleep(0.05)


def test_rules_survive_restarts_and_sighup_reloads_them(tmp_path: Path) -> None:
    d = Daemon(tmp_path, extra=EXTRA).start()
    base = d.cfg.read_text()
    try:
        assert _put_json(d, RULES_V2)[0] == 200
        _views(d, 2)
    finally:
        assert d.stop() == 0, d.logtext()
    # restart, config unchanged: the PUT's version is kept
    d.start()
    try:
        v = _same(_views(d, 2))
        assert v["source"] == "api" and v["rules"]["mappingRules"][0]["name"] == "up at 2s"
        assert "saved rules version 2 (api) kept" in d.log.read_text()
        # SIGHUP with the config unchanged does not undo the PUT
        _sighup(d, "applied by every worker")
        assert "the config's rules are unchanged; rules stay at version 2" in d.log.read_text()
        # SIGHUP with edited rules: a new version from the config, on every worker
        d.cfg.write_text(base.replace(EXTRA, live_config(default_policies=("2s:2h",))))
        _sighup(d, "applied by every worker")
        v3 = _same(_views(d, 3))
        assert v3["source"] == "config" and v3["rules"]["defaultPolicies"] == ["2s:2h"]
        assert [r["name"] for r in v3["rules"]["mappingRules"]] == ["keep2s"]
        assert "downsample.rules: changed" in d.log.read_text()
        # a config rule whose namespace the daemon lacks: refused, named, version kept
        d.cfg.write_text(base.replace(EXTRA, live_config(default_policies=("1m:30d",))))
        _sighup(d, "applied by every worker")
        assert ("downsample.rules.defaultPolicies[0]: storage policy 1m:30d writes to "
                "namespace 'agg_1m_30d', which the running daemon does not have; a new "
                "namespace needs a restart") in d.log.read_text()
        assert _same(_views(d, 3))["version"] == 3
        # a PUT after the SIGHUP, then a SIGKILLed worker: its new incarnation has it too
        d.cfg.write_text(base.replace(EXTRA, live_config(default_policies=("2s:2h",))))
        _sighup(d, "applied by every worker")
        assert _put_json(d, RULES_V2)[0] == 200
        before = _same(_views(d, 4))
        os.kill(d.workers()[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while d.log.read_text().count("serving shards") < 3:
            assert time.monotonic() < deadline, d.logtext()
            time.sleep(0.05)
        _same({0: before, 1: _same(_views(d, 4))})
    finally:
        assert d.stop() == 0, d.logtext()
    # the config edited after the last PUT: at start it is newer and becomes version 5
    time.sleep(0.01)
    d.cfg.write_text(base.replace(EXTRA, live_config(default_policies=("1s:2h", "2s:2h"))))
    d.start()
    try:
        v5 = _same(_views(d, 5))
        assert v5["source"] == "config" and v5["rules"]["defaultPolicies"] == ["1s:2h", "2s:2h"]
        assert v5["activation_ms"] > v5["updated_ms"]
    finally:
        assert d.stop() == 0, d.logtext()


def test_a_worker_killed_between_a_change_and_its_activation(tmp_path: Path) -> None:
    """The killed worker's successor finds its series planned with the new version already
    (cells survive in shared memory), does not plan them again, and once the activation's
    windows are final every old plan is freed: the cells are the new version's only."""
    d = Daemon(tmp_path, extra=live_config("4s")).start()
    try:
        series = [({"__name__": f"load_{i}", "i": str(i)}, [(now_ms(), 1.0)]) for i in range(16)]
        assert d.write(series)[0] == 204
        deadline = time.monotonic() + 20
        while _metric(d, "m3shm_downsample_cells") < 16:   # one Last cell per series
            assert time.monotonic() < deadline, d.logtext()
            time.sleep(0.1)
        v2 = {"mappingRules": [{"name": "two", "filter": "__name__:load_*",
                                "aggregations": ["Count", "Max"],
                                "storagePolicies": ["1s:2h"]}],
              "defaultPolicies": ["1s:2h", "2s:2h"]}
        code, doc, _ = _put_json(d, v2)
        assert code == 200, doc
        act = doc["data"]["activation_ms"]
        while d.log.read_text().count("rules version 2 planned") < 2:
            assert time.monotonic() < deadline, d.logtext()
            time.sleep(0.05)
        assert "rules version 2 planned (" in d.log.read_text()
        # both plans of every series: the old Last cell and the new Count/Max and 2s cells
        # (each worker publishes its cell count on its heartbeat, so the sum catches up)
        while _metric(d, "m3shm_downsample_cells") != 16 * 3:
            assert time.monotonic() < deadline, _metric(d, "m3shm_downsample_cells")
            time.sleep(0.05)
        assert now_ms() < act
        os.kill(d.workers()[0], signal.SIGKILL)
        while d.log.read_text().count("serving shards") < 3:
            assert time.monotonic() < deadline, d.logtext()
            time.sleep(0.05)
        _same(_views(d, 2))
        log = d.log.read_text()
        assert log.count("rules version 2 planned") == 3
        assert "rules version 2 planned (0 series changed" in log   # the successor's
        while now_ms() < act + 4000 + 2500:   # admission 4 s, then finalise rounds
            time.sleep(0.1)
        deadline = time.monotonic() + 20
        while _metric(d, "m3shm_downsample_cells") != 16 * 2:
            assert time.monotonic() < deadline, _metric(d, "m3shm_downsample_cells")
            time.sleep(0.2)
    finally:
        assert d.stop() == 0, d.logtext()
