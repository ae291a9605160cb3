"""Rule change under load: no lost or double-counted windows.

Two workers ingest a steady stream while the rules change through PUT /api/v1/rules. Version 1
keeps ``load_*`` series at 1 s as Count and Max, version 2 as Count and Min, so every output
window says which version made it: Max points only for windows ending at or before the
activation time, Min points only after, and the Count of every window (whichever version made
it) equals the raw samples in it, exactly once. Half the series are written 1.5 s behind the
wall clock (a lagging remote-write queue: samples stamped before the activation arrive after
it) and half 0.5 s ahead (a fast clock: samples stamped after the activation arrive before
it), so a switch made by wall clock instead of by sample time would lose or double-count
windows around the boundary.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from pathlib import Path

import snappy
from rules_config import rules_config, short_raw
from test_daemon_harness import Daemon, now_ms

from m3shm.proto import remote_read_pb2 as rr

EXTRA = rules_config({"name": "load", "filter": "__name__:load_*",
                      "aggregations": ["Count", "Max"], "storagePolicies": ["1s:2h"]},
                     default_policies=["1s:2h"], admission="3s",
                     raw=short_raw("2h", "1h", "3s", "1s"))
V2 = {"mappingRules": [{"name": "load", "filter": "__name__:load_*",
                        "aggregations": ["Count", "Min"], "storagePolicies": ["1s:2h"]}],
      "defaultPolicies": ["1s:2h"]}
NSERIES = 32
OFFSETS = (-1500, 500)   # ms from the wall clock: lagging and ahead


class Writer(threading.Thread):
    """Writes one sample per series every 100 ms until stopped; keeps what was acknowledged."""

    def __init__(self, d: Daemon) -> None:
        super().__init__(daemon=True)
        self.d = d
        self.stop = threading.Event()
        self.acked: dict[str, list[tuple[int, float]]] = {f"load_{i}": [] for i in
                                                          range(NSERIES)}
        self.failed = 0
        self.n = 0

    def run(self) -> None:
        while not self.stop.is_set():
            t = now_ms()
            batch = []
            for i, name in enumerate(self.acked):
                ts = t + OFFSETS[i % 2] + i   # distinct stamps per series
                batch.append(({"__name__": name, "job": "load"},
                              [(ts, float((self.n * 7 + i) % 101))]))
            code = self.d.write(batch)[0]
            if code == 204:
                for (labels, samples) in batch:
                    self.acked[labels["__name__"]].extend(samples)
            else:
                self.failed += 1
            self.n += 1
            self.stop.wait(0.1)


def remote_read(d: Daemon, start: int, end: int) -> dict[tuple, dict[int, float]]:
    req = rr.ReadRequest(queries=[rr.Query(
        start_timestamp_ms=start, end_timestamp_ms=end,
        matchers=[rr.LabelMatcher(type=rr.LabelMatcher.RE, name="__name__", value="load_.*")])],
        accepted_response_types=[rr.ReadRequest.SAMPLES])
    code, body, _ = d.post("/api/v1/read", snappy.compress(req.SerializeToString()),
                           {"X-Prometheus-Remote-Read-Version": "0.1.0"})
    assert code == 200, body
    resp = rr.ReadResponse.FromString(snappy.decompress(body))
    out: dict[tuple, dict[int, float]] = {}
    for ts in resp.results[0].timeseries:
        key = tuple(sorted((lb.name, lb.value) for lb in ts.labels))
        out[key] = {s.timestamp: s.value for s in ts.samples}
    return out


def _key(name: str, agg: str) -> tuple:
    return tuple(sorted({"__name__": name, "job": "load", "m3_aggregation": agg}.items()))


def _window_end(ts: int) -> int:
    return math.ceil(ts / 1000) * 1000   # windows are (end - 1 s, end]


def test_rule_change_under_load_loses_and_double_counts_no_window(tmp_path: Path) -> None:
    d = Daemon(tmp_path, extra=EXTRA).start()
    w = Writer(d)
    try:
        w.start()
        time.sleep(1.5)
        req = urllib.request.Request(d.url + "/api/v1/rules", data=json.dumps(V2).encode(),
                                     method="PUT", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            act = json.loads(r.read())["data"]["activation_ms"]
        while now_ms() < act + 4000:   # well past the boundary for the lagging series too
            time.sleep(0.1)
        w.stop.set()
        w.join()
        assert w.failed == 0
        # every acknowledged sample's window, per series and version
        want: dict[str, dict[int, list[float]]] = {}
        for name, samples in w.acked.items():
            for ts, v in samples:
                want.setdefault(name, {}).setdefault(_window_end(ts), []).append(v)
        first = min(min(ws) for ws in want.values())
        last = max(max(ws) for ws in want.values())
        assert first < act < last
        # wait until the last windows are final and written (admission 3 s + finalise rounds)
        deadline = time.monotonic() + 60
        while True:
            got = remote_read(d, first - 1000, last + 1000)
            done = all(max(want[n]) in got.get(_key(n, "count"), {}) for n in want)
            if done:
                break
            assert time.monotonic() < deadline, "the last windows were never written"
            time.sleep(0.5)
        for name, windows in want.items():
            count, mx, mn = (got.get(_key(name, a), {}) for a in ("count", "max", "min"))
            assert set(count) == set(windows), (name, act, sorted(set(count) ^ set(windows)))
            for end, vs in windows.items():
                assert count[end] == len(vs), (name, end, count[end], len(vs), act)
                if end <= act:
                    assert mx.get(end) == max(vs) and end not in mn, (name, end, act)
                else:
                    assert mn.get(end) == min(vs) and end not in mx, (name, end, act)
            assert set(mx) | set(mn) == set(windows)
        metrics = d.get("/metrics")[1].decode()
        assert "m3shm_downsample_late_samples_total 0" in metrics
    finally:
        w.stop.set()
        assert d.stop() == 0, d.logtext()
