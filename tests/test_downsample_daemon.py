"""Downsampling end to end: the daemon as a subprocess, samples by remote write, aggregated
points read back from the aggregated namespaces' shared segments (what their queries read).

Windows are made to close within seconds: short policies, a short admission, or (for the
seed's 1m and 1h policies) samples just before the last hour boundary with an admission that
ends a few seconds after the test starts.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from m3shm.config import NamespaceConfig
from m3shm.shm import Segment, parse_labels
from tests.rules_config import rules_config
from tests.test_daemon_harness import Daemon, now_ms
from tests.test_rules import SEED as SEED_AS_WRITTEN

HOUR = 3_600_000

# the seed's mapping rule as the seed writes it, with an admission window for the test
SEED = SEED_AS_WRITTEN.replace("downsample:\n", "downsample:\n  admission: {adm}ms\n", 1)


def agg_points(d: Daemon, ns: str) -> dict[tuple, list[tuple[int, float]]]:
    """Every series of aggregated namespace ``ns`` with its points, from its segment."""
    from m3shm.workers.nsruntime import segment_path

    seg = Segment.open(segment_path(str(d.data), NamespaceConfig(name=ns, resolution_ms=1)))
    out = {}
    try:
        for shard in range(seg.params.num_shards):
            for info in seg.live_series(shard):
                ts, vs = seg.read_series(shard, info.slot, -(2**62), 2**62)
                if len(ts):
                    key = tuple(sorted(parse_labels(info.labels).items()))
                    out[key] = list(zip(ts.tolist(), vs.tolist(), strict=True))
    finally:
        seg.close()
    return out


def wait_points(d: Daemon, ns: str, pred, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = agg_points(d, ns)
        if pred(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{ns}: {got}\n{d.logtext()}")
        time.sleep(0.3)


def metric(d: Daemon, name: str) -> float:
    code, body = d.get("/metrics")
    assert code == 200
    m = re.search(rf"^{name} (\S+)$", body.decode(), re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_metric(d: Daemon, name: str, want: float, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while metric(d, name) != want:
        assert time.monotonic() < deadline, f"{name} = {metric(d, name)}, want {want}"
        time.sleep(0.1)


def key(**labels: str) -> tuple:
    return tuple(sorted(labels.items()))


def test_seed_mapping_rule_at_three_policies(tmp_path: Path) -> None:
    """The seed's rule as written: disk_used* on sd* devices at 10s:2d, 1m:30d and 1h:5y;
    other series keep the default Last at 1m:30d. Samples sit just before the last hour
    boundary H, so every policy's window ends at H; the admission closes them seconds after
    the test starts."""
    t0 = now_ms()
    h = t0 - t0 % HOUR
    adm = t0 - h + 12_000
    d = Daemon(tmp_path, extra=SEED.format(adm=adm)).start()
    try:
        sda = {"__name__": "disk_used_bytes", "device": "sda", "host": "a"}
        nvme = {"__name__": "disk_used_bytes", "device": "nvme0", "host": "a"}
        other = {"__name__": "cpu_seconds", "host": "a"}
        samples = [(h - 8000, 10.0), (h - 5000, 30.0), (h - 2000, 20.0)]
        code, body, _ = d.write([(sda, samples), (nvme, samples), (other, samples)])
        assert code == 204, body
        wait_metric(d, "m3shm_downsample_cells", 5)  # 3 + 1 + 1
        want = [(h, 20.0)]  # Last of the window (h - 10s, h], (h - 1m, h], (h - 1h, h]
        got10 = wait_points(d, "agg_10s_2d", lambda g: key(**sda) in g)
        assert got10 == {key(**sda): want}
        got1m = wait_points(d, "agg_1m_30d", lambda g: len(g) == 3)
        assert got1m == {key(**sda): want, key(**nvme): want, key(**other): want}
        got1h = wait_points(d, "agg_1h_5y", lambda g: key(**sda) in g)
        assert got1h == {key(**sda): want}
        # the raw samples are stored as ever
        assert d.export_map('{__name__="disk_used_bytes",device="sda"}')[key(**sda)] == dict(
            samples)
        wait_metric(d, "m3shm_downsample_points_total", 5)
    finally:
        d.stop()


SHORT = rules_config({"name": "debug series are not kept raw", "filter": "__name__:*_debug",
                      "drop": True},
                     {"name": "latency extremes", "filter": "__name__:latency_ms",
                      "aggregations": ["Max", "Min", "Count"], "policies": ["2s:2h"]},
                     default_policies=["2s:2h"], admission="2s")


def test_default_last_for_every_series_late_samples_and_drop(tmp_path: Path) -> None:
    d = Daemon(tmp_path, extra=SHORT).start()
    try:
        t = now_ms()
        end = t - t % 2000 + 4000  # a window (end - 2s, end] still ahead
        s1 = {"__name__": "up", "job": "a"}
        s2 = {"__name__": "latency_ms", "job": "a"}
        dbg = {"__name__": "x_debug", "job": "a"}
        code, body, _ = d.write([(s1, [(end - 1500, 1.0), (end - 500, 2.0)]),
                                 (s2, [(end - 1500, 7.0), (end - 1000, 3.0), (end, 5.0)]),
                                 (dbg, [(end - 1000, 4.0)])])
        assert code == 204, body
        got = wait_points(d, "agg_2s_2h", lambda g: len(g) == 4)
        assert got == {  # a dropped series gets no default policy either (only rollups)
            key(**s1): [(end, 2.0)],
            key(**s2, m3_aggregation="max"): [(end, 7.0)],
            key(**s2, m3_aggregation="min"): [(end, 3.0)],
            key(**s2, m3_aggregation="count"): [(end, 3.0)],
        }
        assert d.export_map('{__name__="x_debug"}') == {}
        wait_metric(d, "m3shm_downsample_raw_dropped_samples_total", 1)
        # a sample for a window final long ago: counted late, not applied, stored raw
        late_ts = end - 60_000
        assert d.write([(s1, [(late_ts, 9.0)])])[0] == 204
        deadline = time.monotonic() + 20
        while metric(d, "m3shm_downsample_late_samples_total") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert metric(d, "m3shm_downsample_late_samples_total") == 1
        time.sleep(2.5)  # a finalise round or two later: still no point for it
        assert all(ts != late_ts - late_ts % 2000 + 2000 for ts, _ in
                   agg_points(d, "agg_2s_2h")[key(**s1)])
        assert d.export_map('{__name__="up"}')[key(**s1)][late_ts] == 9.0
    finally:
        d.stop()


RESTART = rules_config({"name": "sums", "filter": "__name__:req_*",
                        "aggregations": ["Sum", "Count"], "policies": ["5s:2h"]},
                       default_policies=[], admission="4s")


def test_restart_mid_window(tmp_path: Path) -> None:
    """Window W0 is finalised before the crashes, W1 is open across two of them: SIGKILL of
    the workers (their cells survive in shared memory), then of everything (the cells are
    rebuilt from the commit log). W0 keeps its one right point and W1 counts the samples
    written before, between and after the crashes exactly once."""
    d = Daemon(tmp_path, extra=RESTART).start()
    try:
        s = {"__name__": "req_total", "job": "a"}
        t = now_ms()
        e0 = t - t % 5000 + 5000
        e1 = e0 + 20_000  # ahead (bufferFuture allows it), so the restarts have time
        assert d.write([(s, [(e0 - 4000, 1.0), (e0 - 1000, 2.0)])])[0] == 204
        sum_k, count_k = key(**s, m3_aggregation="sum"), key(**s, m3_aggregation="count")
        wait_points(d, "agg_5s_2h", lambda g: sum_k in g)
        time.sleep(1.5)  # a finalise round after W0's: the replay watermark is past W0
        assert d.write([(s, [(e1 - 4500, 10.0), (e1 - 4000, 20.0)])])[0] == 204
        before = d.workers()
        for p in before:
            os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not (len(d.workers()) == len(before) and not set(d.workers()) & set(before)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        d.wait_ready()
        assert d.write([(s, [(e1 - 3000, 100.0)])])[0] == 204
        d.kill_all()
        d.start()
        assert now_ms() < e1 + 4000, "the restarts took longer than W1's admission"
        assert d.write([(s, [(e1 - 2000, 1000.0)])])[0] == 204
        got = wait_points(d, "agg_5s_2h",
                          lambda g: any(ts == e1 for ts, _ in g.get(sum_k, [])))
        assert got[sum_k] == [(e0, 3.0), (e1, 1130.0)]
        assert got[count_k] == [(e0, 2.0), (e1, 4.0)]
    finally:
        d.stop()
