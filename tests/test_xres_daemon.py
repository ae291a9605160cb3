"""Queries across resolutions end to end: remote write in, the daemon downsamples as samples
arrive (default policy 1s:2h, Last), PromQL out over HTTP.

The raw namespace keeps 10 s, so after ~16 s of real-time writes a query over the last 30 s
must read 1s Last points before the raw retention boundary and every raw sample after it; a
series whose raw data a drop rule discards is found in the aggregated namespace; rate() over
the downsampled counter equals the raw counter's; X-M3shm-Namespaces names what was read.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request

from rules_config import rules_config, short_raw
from test_daemon_harness import Daemon, now_ms

CONFIG = rules_config({"name": "dropped raw", "filter": "__name__:*_debug", "drop": True},
                      {"name": "kept downsampled", "filter": "__name__:*_debug",
                       "policies": ["1s:2h"]},
                      default_policies=["1s:2h"], admission="3s",
                      raw=short_raw("10s", "2s", "1s", "1s"))
STEP = 250  # ms between samples
RAW_RET = 10_000


def get(d: Daemon, path: str, **params) -> tuple[dict, dict[str, str]]:
    with urllib.request.urlopen(f"{d.url}{path}?{urllib.parse.urlencode(params)}",
                                timeout=30) as r:
        return json.loads(r.read()), dict(r.headers)


def test_downsampled_before_the_raw_retention_raw_after(tmp_path):
    d = Daemon(tmp_path, extra=CONFIG).start()
    try:
        written: dict[int, float] = {}
        t = now_ms() // STEP * STEP + STEP
        end = t + 16_000
        while t <= end:  # real time: windows close as samples arrive
            while now_ms() < t:
                time.sleep(0.01)
            v = float(len(written))  # a counter: +1 every 250 ms
            written[t] = v
            code, body, _ = d.write([({"__name__": "xc"}, [(t, v)]),
                                     ({"__name__": "xd_debug"}, [(t, v)])])
            assert code == 204, body
            t += STEP
        last = max(written)
        first = min(written)
        qt = -(-last // 1000) * 1000  # the end of the last sample's window

        def points_from_agg() -> bool:  # that window is final: its point exists
            r, _ = get(d, "/api/v1/query", query="xd_debug[2s]", time=qt / 1000)
            res = r["data"]["result"]
            return bool(res) and round(float(res[0]["values"][-1][0]) * 1000) == qt

        deadline = time.monotonic() + 20
        while not points_from_agg():
            assert time.monotonic() < deadline, d.logtext()
            time.sleep(0.2)

        q0 = now_ms()
        r, h = get(d, "/api/v1/query", query="xc[30s]", time=last / 1000)
        q1 = now_ms()
        assert r["status"] == "success", r
        (series,) = r["data"]["result"]
        got = {round(float(ts) * 1000): float(v) for ts, v in series["values"]}
        assert h["X-M3shm-Namespaces"] == "default=raw,agg_1s_2h=1s", h
        assert any("agg_1s_2h (1s resolution" in w for w in r.get("warnings", [])), r
        # before the boundary (now - 10 s, somewhere in [q0, q1] - 10 s): 1s Last points, each
        # the raw value at its window end; after it: every raw sample
        before = [ts for ts in got if ts < q0 - RAW_RET]
        after = [ts for ts in written if ts >= q1 - RAW_RET]
        assert len(before) >= 3 and len(after) >= 3, (before, after)
        assert all(ts % 1000 == 0 for ts in before)
        assert before == list(range(-(-first // 1000) * 1000, q0 - RAW_RET, 1000))
        assert all(got[ts] == written[ts] for ts in got)
        assert all(ts in got for ts in after)

        # rate over the downsampled counter is the raw counter's (4 per second)
        at = (q0 - RAW_RET - 1000) // 1000 * 1000
        r, _ = get(d, "/api/v1/query", query="rate(xc[3s])", time=at / 1000)
        assert float(r["data"]["result"][0]["value"][1]) == 4.0
        r, _ = get(d, "/api/v1/query", query="rate(xc[3s])", time=last / 1000)
        assert float(r["data"]["result"][0]["value"][1]) == 4.0

        # the series whose raw samples a rule drops exists downsampled only: found there
        r, h = get(d, "/api/v1/query", query="xd_debug", time=qt / 1000)
        assert [float(s["value"][1]) for s in r["data"]["result"]] == [written[last]]
        assert h["X-M3shm-Namespaces"] == "agg_1s_2h=1s"
    finally:
        d.stop()
