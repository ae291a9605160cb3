"""Queries over flushed blocks merged with shared memory, through a real daemon.

Samples are written, their (2-second) blocks close and are flushed to filesets
(POST /api/v1/admin/flush), more samples land in shared memory (newer blocks, and cold writes
that overwrite flushed samples), and the daemon is restarted: every query path -- PromQL,
series, labels, label values, remote read -- must see the union, with the last write of a
timestamp winning, before and after the restart.
"""

from __future__ import annotations

import json
import urllib.parse

import snappy
from test_daemon_harness import Daemon, now_ms
from test_flush import BLOCK, fast_daemon, wait_closed

from m3shm.proto import remote_read_pb2 as rr
from m3shm.storage.fileset import list_filesets


def raw_samples(d: Daemon, selector: str, at_ms: int) -> dict[tuple, dict[int, float]]:
    """Every raw sample of the selector in the hour before at_ms (a range-vector query)."""
    q = urllib.parse.urlencode({"query": f"{selector}[1h]", "time": at_ms / 1000})
    code, body = d.get(f"/api/v1/query?{q}")
    assert code == 200, body
    r = json.loads(body)
    assert r["status"] == "success" and r["data"]["resultType"] == "matrix", r
    assert not r.get("warnings"), r
    return {tuple(sorted(s["metric"].items())): {round(float(t) * 1000): float(v)
                                                 for t, v in s["values"]}
            for s in r["data"]["result"]}


def remote_read(d: Daemon, name: str, mint: int, maxt: int) -> dict[tuple, dict[int, float]]:
    req = rr.ReadRequest()
    q = req.queries.add()
    q.start_timestamp_ms, q.end_timestamp_ms = mint, maxt
    m = q.matchers.add()
    m.type, m.name, m.value = rr.LabelMatcher.EQ, "__name__", name
    code, body, _ = d.post("/api/v1/read", snappy.compress(req.SerializeToString()),
                           {"Content-Type": "application/x-protobuf",
                            "Content-Encoding": "snappy"})
    assert code == 200, body
    resp = rr.ReadResponse()
    resp.ParseFromString(snappy.uncompress(body))
    return {tuple(sorted((lb.name, lb.value) for lb in ts.labels)):
            {s.timestamp: s.value for s in ts.samples} for ts in resp.results[0].timeseries}


def listing(d: Daemon, path: str, **params) -> list:
    code, body = d.get(path + "?" + urllib.parse.urlencode(params, doseq=True))
    assert code == 200, body
    return json.loads(body)["data"]


def key(labels: dict[str, str]) -> tuple:
    return tuple(sorted(labels.items()))


def check_all(d: Daemon, want: dict, at_ms: int) -> None:
    assert raw_samples(d, "fq", at_ms) == want
    assert remote_read(d, "fq", at_ms - 3_600_000, at_ms) == want
    series = listing(d, "/api/v1/series", **{"match[]": "fq"})
    assert sorted(key(s) for s in series) == sorted(want)
    assert set(listing(d, "/api/v1/labels")) >= {"__name__", "i", "only"}
    assert listing(d, "/api/v1/label/only/values") == ["disk"]
    assert listing(d, "/api/v1/label/i/values", **{"match[]": "fq"}) == \
        sorted({dict(k)["i"] for k in want})


def test_flushed_and_shm_merge_and_survive_restart(tmp_path):
    d = fast_daemon(tmp_path).start()
    want: dict[tuple, dict[int, float]] = {}
    try:
        t0 = now_ms() - 900
        old = [({"__name__": "fq", "i": str(i)}, [(t0 + k * 100, float(i * 100 + k))
                                                  for k in range(8)]) for i in range(6)]
        only_disk = [({"__name__": "fq", "i": "99", "only": "disk"}, [(t0 + 50, 7.5)])]
        assert d.write(old + only_disk)[0] == 204
        for lab, smp in old + only_disk:
            want[key(lab)] = dict(smp)
        wait_closed(t0 + 800)
        code, body = d.post("/api/v1/admin/flush", b"")[:2]
        assert code == 200, body
        assert list_filesets(d.data / "filesets"), "nothing was flushed"
        # newer samples in memory, and cold overwrites of flushed timestamps (last write wins)
        t1 = now_ms() - 500
        new = [({"__name__": "fq", "i": str(i)}, [(t1 + k * 100, -float(k)) for k in range(3)])
               for i in range(3)]
        over = [({"__name__": "fq", "i": str(i)}, [(t0 + 200, 1000.0 + i)]) for i in range(2)]
        assert d.write(new)[0] == 204
        assert d.write(over)[0] == 204
        for lab, smp in new + over:
            want[key(lab)].update(dict(smp))
        at = now_ms()
        assert t1 // BLOCK > t0 // BLOCK  # the new samples are in a later block than the old
        check_all(d, want, at)
    finally:
        assert d.stop() == 0
    d.start()
    try:
        check_all(d, want, at)
    finally:
        assert d.stop() == 0
