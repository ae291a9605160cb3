"""Queries across resolutions through the daemon's HTTP API.

The daemon runs with a raw namespace (1h retention) and an aggregated one (1m:30d, the
default policy's). Raw samples arrive by remote write; the aggregated namespace's data are
flushed filesets written beside the daemon's own (what its flush writes for that namespace),
with the Last points of the same counter computed by the aggregation cells (csrc/aggwin.c),
and a series that exists only there (a rollup). Answers must stitch the two at the raw
retention boundary, find the rollup, and name what they read in the X-M3shm-Namespaces header
and the warnings.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import numpy as np
import snappy
from test_daemon_harness import Daemon, now_ms
from test_query_xres import counter, downsample, fileset_write
from test_remote_read import decode_xor, q, read, read_frames

from m3shm.proto import remote_read_pb2 as rr

MIN, HOUR = 60_000, 3_600_000
CONFIG = """
namespaces:
  - {name: default, retention: 1h, blockSize: 1h, bufferPast: 10m, bufferFuture: 2m}
  - {name: agg_1m_30d, resolution: 1m, retention: 30d, blockSize: 12h, bufferPast: 10m,
     bufferFuture: 2m}
"""
SHARDS = 8  # the harness config's


def get(d: Daemon, path: str, **params) -> tuple[dict, dict[str, str]]:
    with urllib.request.urlopen(f"{d.url}{path}?{urllib.parse.urlencode(params)}",
                                timeout=30) as r:
        return json.loads(r.read()), dict(r.headers)


def test_stitched_query_over_http(tmp_path):
    t0 = now_ms()
    d = Daemon(tmp_path, extra=CONFIG)
    ts, vs = counter(t0 - 5 * HOUR, t0)
    t1, v1 = downsample(ts, vs, MIN)
    # the aggregated namespace holds points up to 30 min ago (overlapping the raw retention:
    # they must be clipped there), none within 30 s of the boundary the test cannot pin down
    boundary = t0 - HOUR
    keep = (t1 < t0 - 30 * MIN) & ~((t1 >= boundary - 1000) & (t1 <= boundary + 30_000))
    t1, v1 = t1[keep], v1[keep]
    rt, rv = counter(t0 - 5 * HOUR, t0, seed=9)
    r1, rv1 = downsample(rt, rv, MIN)
    fileset_write(d.data / "filesets", "agg_1m_30d", 12 * HOUR, [
        ({"__name__": "xc", "i": "0"}, t1, v1),
        ({"__name__": "xr", "service": "a"}, r1[r1 < t0 - 2 * MIN], rv1[r1 < t0 - 2 * MIN]),
    ], shards=SHARDS)
    d.start()
    try:
        raw = ts >= t0 - 50 * MIN
        for a in range(0, int(raw.sum()), 100):
            rts, rvs = ts[raw][a:a + 100], vs[raw][a:a + 100]
            code, body, _ = d.write([({"__name__": "xc", "i": "0"},
                                      list(zip(rts.tolist(), rvs.tolist(), strict=True)))])
            assert code == 204, body

        # the last 3 hours: 1m points before the raw retention boundary, raw samples after
        r, h = get(d, "/api/v1/query", query="xc[3h]", time=t0 / 1000)
        assert r["status"] == "success", r
        got = [round(float(t) * 1000) for t, _ in r["data"]["result"][0]["values"]]
        want = np.concatenate([t1[(t1 >= t0 - 3 * HOUR) & (t1 < boundary)], ts[raw]])
        assert got == want.tolist()
        assert h["X-M3shm-Namespaces"] == "default=raw,agg_1m_30d=1m"
        assert any("downsampled data from agg_1m_30d (1m resolution" in w
                   for w in r.get("warnings", [])), r
        # remote read answers the same samples, also streamed (decoded a group at a time)
        query = q(t0 - 3 * HOUR, t0, (0, "__name__", "xc"))
        code, body, h = read(d, [query], [rr.ReadRequest.SAMPLES])
        assert code == 200, body
        resp = rr.ReadResponse.FromString(snappy.uncompress(body))
        assert [s.timestamp for s in resp.results[0].timeseries[0].samples] == want.tolist()
        assert h["X-M3shm-Namespaces"] == "default=raw,agg_1m_30d=1m"
        code, body, h = read(d, [query], [rr.ReadRequest.STREAMED_XOR_CHUNKS])
        assert code == 200, body
        assert h["X-M3shm-Namespaces"] == "default=raw,agg_1m_30d=1m"
        (cs,) = [cs for fr in read_frames(body) for cs in fr.chunked_series]
        assert [t for c in cs.chunks for t, _ in decode_xor(c.data)] == want.tolist()

        # within the raw retention only raw data is read, and nothing is said about it
        r, h = get(d, "/api/v1/query_range", query="xc", start=(t0 - 20 * MIN) / 1000,
                   end=t0 / 1000, step=60)
        assert h["X-M3shm-Namespaces"] == "default=raw" and "warnings" not in r, r
        assert len(r["data"]["result"][0]["values"]) == 21
        code, body, h = read(d, [q(t0 - 20 * MIN, t0, (0, "__name__", "xc"))],
                             [rr.ReadRequest.STREAMED_XOR_CHUNKS])
        assert code == 200 and h["X-M3shm-Namespaces"] == "default=raw", (code, h)

        # a series that exists only downsampled (a rollup) is found in the raw retention too
        r, h = get(d, "/api/v1/query", query="xr", time=t0 / 1000)
        assert [s["metric"] for s in r["data"]["result"]] == [{"__name__": "xr",
                                                               "service": "a"}]
        assert float(r["data"]["result"][0]["value"][1]) == rv1[r1 < t0 - 2 * MIN][-1]
        assert h["X-M3shm-Namespaces"] == "agg_1m_30d=1m"
        r, h = get(d, "/api/v1/series", **{"match[]": "{__name__=~\"x.\"}",
                                            "start": (t0 - 10 * MIN) / 1000,
                                            "end": t0 / 1000})
        assert sorted(s["__name__"] for s in r["data"]) == ["xc", "xr"]
        assert h["X-M3shm-Namespaces"] == "default=raw,agg_1m_30d=1m"
        # rate over the stitched range is continuous: the 1m Last points of a counter give
        # the raw data's rate at minute boundaries on both sides of the boundary
        at = (boundary - 10 * MIN) // MIN * MIN
        r, _ = get(d, "/api/v1/query", query="increase(xc[5m])", time=at / 1000)
        inc = float(r["data"]["result"][0]["value"][1])
        tv = dict(zip(ts.tolist(), vs.tolist(), strict=True))
        assert inc == tv[at] - tv[at - 5 * MIN]
    finally:
        d.stop()
