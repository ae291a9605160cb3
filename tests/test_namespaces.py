"""Aggregated namespaces have real storage (m3shm/workers/nsruntime.py): their own segment,
commit-log directory, replay, flush, trimming and retention.

A writer process builds records from rows in C (m3shm/storage/records.py) and submits them
through a real IngestPipeline into the aggregated namespace's own commit-log directory, exactly
as a worker's ``w.ns[name].pipeline.submit`` does; it is SIGKILLed once every submit returned.
Then a real daemon starts on the data directory: every acknowledged point must be in the
aggregated namespace's segment (replayed from that namespace's directory, not the raw one),
then in its filesets after an admin flush (which trims that directory), again after SIGKILL of
every process and a restart, and the namespace's short retention must delete its filesets while
the raw namespace's (same time range, long retention) stay.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_daemon_harness import Daemon, now_ms

from m3shm import codec, config
from m3shm.config import ConfigError
from m3shm.shm import Segment, make_record, parse_labels
from m3shm.storage.commitlog import Batch, CommitLog
from m3shm.storage.fileset import Fileset, list_filesets
from m3shm.supervisor import check_meta
from m3shm.workers.nsruntime import commitlog_dir, segment_path

AGG = "agg_1s_20s"
EXTRA = f"""
namespaces:
  - {{name: default, blockSize: 2s, retention: 1h, bufferPast: 1s, bufferFuture: 1s}}
  - {{name: {AGG}, resolution: 1s, retention: 20s, blockSize: 2s, bufferPast: 1s,
     bufferFuture: 1s}}
downsample:
  rules: {{defaultPolicies: [1s:20s]}}
flush:
  retention_interval: 1s
"""

WRITER = r"""
import asyncio, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from m3shm import config
from m3shm.shm import Segment, canonical_labels
from m3shm.storage.commitlog import CommitLog
from m3shm.storage.records import LabelTable, build_records
from m3shm.supervisor import Supervisor
from m3shm.workers.ingest import IngestPipeline
from m3shm.workers.nsruntime import commitlog_dir

cfg_path, seg_path, name, t0 = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = config.load(cfg_path)
i = [ns.name for ns in cfg.namespaces].index(name)
ns = cfg.namespaces[i]
seg = Segment.create(seg_path, Supervisor(cfg).seg_params(i, ns))
clog = CommitLog(commitlog_dir(cfg.data_dir, ns), boot=1, worker=0, incarnation=0,
                 seq_sync=lambda: seg.next_seq())
table = LabelTable(canonical_labels({"__name__": "nstest", "i": str(k)}) for k in range(40))

async def main():
    pipe = IngestPipeline(seg, 0, clog, ThreadPoolExecutor(1), 250, 64)
    pipe.start()
    for part in range(4):  # 4 batches of 10 series x 20 points
        series = np.repeat(np.arange(part * 10, part * 10 + 10), 20)
        ts = t0 + np.tile(np.arange(20) * 100, 10)
        vs = series * 1000.0 + np.tile(np.arange(20), 10) + 0.25
        batch, length, n = build_records(table, series, ts, vs, seg.params.num_shards)
        adm = await pipe.submit(batch, length, n)
        assert adm.records == n and not adm.rejected_records, adm
        seg.drain_range(0, seg.params.num_shards)  # keep the lanes from filling
    print("acked", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def expected(t0: int) -> dict[str, tuple[list[int], list[float]]]:
    return {str(k): ([t0 + j * 100 for j in range(20)], [k * 1000.0 + j + 0.25
                                                         for j in range(20)])
            for k in range(40)}


def from_segment(data: Path, ns) -> dict[str, tuple[list[int], list[float]]]:
    seg = Segment.open(segment_path(str(data), ns))
    out = {}
    for s in range(seg.params.num_shards):
        for info in seg.live_series(s):
            lab = parse_labels(info.labels)
            if lab["__name__"] == "nstest":
                t, v = seg.read_series(s, info.slot, 0, 1 << 62)
                out[lab["i"]] = (t.tolist(), v.tolist())
    seg.close()
    return out


def from_filesets(data: Path, ns: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for fid in list_filesets(data / "filesets"):
        if fid.namespace != ns:
            continue
        with Fileset(data / "filesets", fid) as fs:
            for sid, _h, block in fs:
                lab = parse_labels(bytes(sid))
                t, v = codec.decode(block)
                out.setdefault(lab.get("i", lab["__name__"]), {}).update(
                    zip(t.tolist(), v.tolist(), strict=True))
    return out


def merged(data: Path, ns) -> dict[str, tuple[list[int], list[float]]]:
    """Filesets, then the segment's points on top (a point read twice must agree)."""
    pts = from_filesets(data, ns.name)
    for k, (t, v) in from_segment(data, ns).items():
        for a, b in zip(t, v, strict=True):
            assert pts.setdefault(k, {}).setdefault(a, b) == b
    pts.pop("rawm", None)
    return {k: (sorted(p), [p[a] for a in sorted(p)]) for k, p in pts.items()}


def admin_flush(d: Daemon) -> None:
    req = urllib.request.Request(d.url + "/api/v1/admin/flush", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200


def test_aggregated_namespace_storage_end_to_end(tmp_path):
    d = Daemon(tmp_path, workers=2, extra=EXTRA)
    d.cfg.write_text(d.cfg.read_text() + f"data_dir: {d.data}\n")
    cfg = config.load(str(d.cfg))
    ns = cfg.namespace(AGG)
    # one 2 s block, closed (start + 2 s + bufferPast 1 s) 1 s after now, expired (end before
    # now - 20 s) 18 s after now: the margin for the steps before the first flush
    t0 = now_ms() - 4000
    t0 -= t0 % 2000
    seg_path = f"/dev/shm/m3shm-test-writer-{os.getpid()}.seg"
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(d.cfg), seg_path, AGG, str(t0)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert w.stdout.readline().strip() == "acked"
    finally:
        w.send_signal(signal.SIGKILL)
        w.wait()
        os.unlink(seg_path)
    want = expected(t0)
    agg_dir = Path(commitlog_dir(str(d.data), ns))
    assert [p.name for p in agg_dir.glob("*.log")] == ["cl-0000000001-w000-0000-0000.log"]

    # 1. replayed from the namespace's own commit-log directory into its own segment
    d.start()
    assert from_segment(d.data, ns) == want
    assert from_segment(d.data, cfg.raw_namespace) == {}
    code, body = d.get("/metrics")
    assert code == 200
    m = dict(line.rsplit(" ", 1) for line in body.decode().splitlines()
             if line.startswith("m3shm_namespace_"))
    assert float(m[f'm3shm_namespace_series{{namespace="{AGG}"}}']) == 40
    assert float(m[f'm3shm_namespace_samples_total{{namespace="{AGG}"}}']) == 800
    assert float(m['m3shm_namespace_samples_total{namespace="default"}']) == 0
    # raw samples over the same time range, into the raw namespace (long retention)
    raw = [(t0 + j * 100, float(j)) for j in range(20)]
    assert d.write([({"__name__": "rawm"}, raw)])[0] == 204

    # 2. flushed into the namespace's filesets; its commit log of boot 1 is trimmed
    admin_flush(d)
    assert {k: (sorted(p), [p[t] for t in sorted(p)])
            for k, p in from_filesets(d.data, AGG).items() if k != "rawm"} == want
    assert from_filesets(d.data, "default")["rawm"] == dict(raw)
    assert not (agg_dir / "cl-0000000001-w000-0000-0000.log").exists()
    states = sorted(p.name for p in (d.data / "flush").glob("state-*.json"))
    assert states == [f"state-{AGG}-w000.json", f"state-{AGG}-w001.json",
                      "state-w000.json", "state-w001.json"]
    st = json.loads((d.data / "flush" / f"state-{AGG}-w000.json").read_text())
    assert (st["block_ms"], st["buffer_past_ms"]) == (2000, 1000)

    # 3. SIGKILL every process; a restart reads every point back
    d.kill_all()
    d.start()
    assert merged(d.data, ns) == want

    # 4. the namespace's retention (20 s) deletes its filesets; the raw ones (1 h) stay
    deadline = time.monotonic() + 60
    while any(f.namespace == AGG for f in list_filesets(d.data / "filesets")):
        assert time.monotonic() < deadline, "aggregated filesets outlived their retention"
        time.sleep(1.0)
        admin_flush(d)
    assert from_filesets(d.data, "default")["rawm"] == dict(raw)
    assert not any(t for t, _ in from_segment(d.data, ns).values())  # no point in memory
    assert d.stop() == 0


def test_block_size_of_an_aggregated_namespace_with_data_is_immutable(tmp_path):
    data = str(tmp_path)
    cfg = config.load(None, data_dir=data)
    agg = cfg.namespace("agg_1m_30d")
    check_meta(data, cfg)
    other = dataclasses.replace(cfg, namespaces=(cfg.raw_namespace, dataclasses.replace(
        agg, block_size_ms=6 * 3_600_000)))
    # a commit-log file with no batch yet (every boot opens one) is no data: a change is fine
    log = CommitLog(commitlog_dir(data, agg), boot=1, worker=0, incarnation=0)
    check_meta(data, other)
    check_meta(data, cfg)
    log.append([Batch(1, 0, 1, make_record({"__name__": "m"}, [1], [1.0], 64))])
    log.close()
    with pytest.raises(ConfigError, match=r"namespaces\[1\]\.blockSize: namespace "
                       r"'agg_1m_30d' holds data written with blockSize=43200000ms"):
        check_meta(data, other)


def test_boot_numbers_count_unconfigured_namespaces_commit_logs(tmp_path):
    """A namespace removed from the config keeps its commit log; boots keep growing past its
    files, so configuring it again replays them (they are of an earlier boot)."""
    data = tmp_path / "data"
    old = data / "commitlog-agg_5m_90d"
    old.mkdir(parents=True)
    log = CommitLog(str(old), boot=7, worker=0, incarnation=0)
    log.close()
    d = Daemon(tmp_path, workers=1)
    d.start()
    assert d.stop() == 0
    assert sorted(p.name[:13] for p in (data / "commitlog").glob("*.log")) == ["cl-0000000008"]
    assert "commitlog-agg_5m_90d belongs to a namespace that is not configured" in d.logtext()
