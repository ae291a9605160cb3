"""Bytes per sample on disk: m3shm against VictoriaMetrics and Prometheus, same payloads, same run.

    .venv/bin/python perf/disk.py [--datasets ingest,real] [--series 2000] [--shards 64]

For each dataset the same snappy remote-write 1.0 bodies (every series' samples of one 10-minute
slice per body, in time order) go to three fresh stores on 127.0.0.1, each in its own temporary
directory, each then brought to its steady on-disk form:

- m3shm (this checkout, ``m3shm serve``, the embedded default namespace: 2 h blocks, 10 min
  buffer past, 48 h retention; ``--shards`` shards, 2 workers): the data is placed in one 2 h
  block that closed hours ago (written as cold writes, within retention), then
  ``POST /api/v1/admin/flush`` writes every block to filesets and deletes the commit log it
  covers. Measured: the whole data directory (filesets with their reverse index, the commit
  log left, flush state, metadata).
- VictoriaMetrics (/usr/bin/victoria-metrics): ``/internal/force_flush``, then
  ``/internal/force_merge`` of the data's month partitions, then wait until the directory stops
  changing. Measured: the whole ``-storageDataPath`` (data and indexdb).
- Prometheus (/usr/bin/prometheus, ``--web.enable-remote-write-receiver``): its head lives in
  the WAL and head chunks until it spans 3 h, so the head is cut into a block with the TSDB
  snapshot API (``skip_head=false``: the compactor writes the head as the same 2 h block a
  compaction would). Measured: that block (chunks, index, meta.json, tombstones); the WAL and
  head chunks it was cut from are reported beside it, not counted.

Datasets: ``ingest`` is perf/ingest.py's series and values (label sets of http_requests_total_*
from 2 clients, counters that grow by one per sample) every 15 s over a whole 2 h block;
``real`` is ../shared/data/real-10s.jsonl.gz (941 real node_exporter and Prometheus series,
10 s scrapes over 76 minutes), timestamps shifted by a whole number of seconds. ``disk`` is
allocated bytes (``du``), ``apparent`` the sum of file sizes (``du -b``).

``zstd_at_flush`` (m3shm only) is the zstd level sweep behind the decision in
docs/formats/fileset.md: the flushed blocks read back from the filesets and compressed per data
file or per 64 consecutive series, with the compressing thread's CPU time (median of 3).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stores import (  # noqa: E402
    M3shm,
    Prometheus,
    Store,
    VictoriaMetrics,
    classify_m3shm,
    du,
    du_by,
    slice_bodies,
)

from m3shm.dataset import default_dataset, read_export  # noqa: E402

BLOCK_MS = 2 * 3_600_000
SLICE_MS = 10 * 60_000


def target_block() -> int:
    """Start of a 2 h block that closed hours ago (well inside the default 48 h retention)."""
    now = int(time.time() * 1000)
    return (now - 8 * 3_600_000) // BLOCK_MS * BLOCK_MS


def ingest_dataset(nseries: int, b0: int):
    """perf/ingest.py's label sets and values, one sample per 15 s over the block."""
    labels, tss, vss = [], [], []
    ts = b0 + np.arange(BLOCK_MS // 15_000, dtype=np.int64) * 15_000
    per_client = 1000
    for n in range(nseries):
        c, i = divmod(n, per_client)
        labels.append({"__name__": f"http_requests_total_{i % 50}", "job": "api",
                       "instance": f"10.0.{c}.{i % 200}:9100", "code": str(200 + i % 5),
                       "handler": f"/api/v{i % 7}"})
        tss.append(ts)
        vss.append(np.arange(len(ts), dtype=np.float64) + i)
    return labels, tss, vss


def real_dataset(path: Path, b0: int):
    series = list(read_export(path))
    lo = min(int(s.timestamps[0]) for s in series if len(s.timestamps))
    shift = b0 + 60_000 - (lo - lo % 1000)  # whole seconds: sub-second jitter is kept
    return ([s.labels for s in series], [s.timestamps + shift for s in series],
            [s.values for s in series])


def months(tss: list[np.ndarray]) -> list[str]:
    lo = min(int(t[0]) for t in tss if len(t))
    hi = max(int(t[-1]) for t in tss if len(t))
    return sorted({time.strftime("%Y_%m", time.gmtime(x / 1000)) for x in (lo, hi)})


def m3shm_fileset_samples(data: Path) -> tuple[int, int]:
    from m3shm.storage.fileset import Fileset, list_filesets

    root = data / "filesets"
    samples = series = 0
    for fid in list_filesets(root):
        with Fileset(root, fid) as fs:
            samples += fs.info.num_samples
            series += fs.info.num_series
    return series, samples


def m3shm_sections(data: Path) -> dict:
    """Bytes of each section of m3shm's version-3 filesets, summed over all of them: as stored
    and, for the sections stored compressed (index, data, revindex), uncompressed."""
    import zstandard

    from m3shm.storage.fileset import FLAG_ZSTD, Fileset, Kind, list_filesets

    root = data / "filesets"
    out: dict[str, dict[str, int]] = {}
    for fid in list_filesets(root):
        with Fileset(root, fid) as fs:
            if fs.version < 3:
                continue
            for kind, view in fs._views.items():
                row = out.setdefault(kind.name.lower(), {"stored": 0, "raw": 0})
                row["stored"] += len(view)
                raw = len(view)
                if kind == Kind.DATA:
                    raw = fs.info.data_bytes
                elif kind == Kind.INDEX:
                    raw = sum(len(fs._index_group(g)) for g in range(len(fs._sum_ids)))
                elif kind == Kind.REVINDEX and fs._flags[kind] & FLAG_ZSTD:
                    raw = len(zstandard.ZstdDecompressor().decompress(view))
                row["raw"] += raw
    return out


def zstd_sweep(data: Path, nsamples: int, levels: list[int], group: int,
               runs: int = 3) -> dict:
    """What a zstd pass at flush would do to m3shm's flushed data files: per level, the data
    bytes when each fileset's data file is one zstd frame ("file") or one frame per ``group``
    consecutive series ("group", which keeps a lookup to one small frame), and the CPU of
    compressing (and decompressing) them, as ns per sample (median of ``runs``)."""
    import statistics

    import zstandard

    from m3shm.storage.fileset import Fileset, list_filesets

    root = data / "filesets"
    files: list[bytes] = []
    groups: list[bytes] = []
    for fid in list_filesets(root):
        with Fileset(root, fid) as fs:
            blocks = [bytes(b) for _sid, _h, b in fs]
        files.append(b"".join(blocks))
        groups += [b"".join(blocks[i:i + group]) for i in range(0, len(blocks), group)]
    raw = sum(map(len, files))
    out: dict = {"raw_data_bytes": raw, "raw_bytes_per_sample": round(raw / nsamples, 4),
                 "group_series": group, "levels": {}}
    for level in levels:
        cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
        row = {}
        for unit, parts in (("file", files), ("group", groups)):
            ctimes, dtimes = [], []
            for _ in range(runs):
                c0 = time.thread_time_ns()
                frames = [cctx.compress(p) for p in parts]
                c1 = time.thread_time_ns()
                for f in frames:
                    dctx.decompress(f)
                dtimes.append(time.thread_time_ns() - c1)
                ctimes.append(c1 - c0)
            size = sum(map(len, frames))
            row[unit] = {"bytes_per_sample": round(size / nsamples, 4),
                         "saved": round(1 - size / raw, 3),
                         "compress_cpu_ns_per_sample": round(statistics.median(ctimes) /
                                                             nsamples, 1),
                         "decompress_cpu_ns_per_sample": round(statistics.median(dtimes) /
                                                               nsamples, 1)}
        out["levels"][str(level)] = row
    return out


def run_store(store: Store, bodies: list[bytes], nsamples: int, settle_args: tuple,
              zstd_levels: list[int] | None = None) -> dict:
    store.start()
    try:
        t0 = time.perf_counter()
        store.write(bodies)
        t1 = time.perf_counter()
        store.settle(*settle_args)
        t2 = time.perf_counter()
        size = du(store.measured_dir())
        out = {"disk_bytes": size["disk"], "apparent_bytes": size["apparent"],
               "bytes_per_sample": round(size["disk"] / nsamples, 3),
               "apparent_bytes_per_sample": round(size["apparent"] / nsamples, 3),
               "write_s": round(t1 - t0, 2), "settle_s": round(t2 - t1, 2)}
        if isinstance(store, M3shm):
            out["breakdown"] = du_by(store.data, classify_m3shm)
            out["fileset_series"], out["fileset_samples"] = m3shm_fileset_samples(store.data)
            out["fileset_sections"] = m3shm_sections(store.data)
            if zstd_levels:
                out["zstd_at_flush"] = zstd_sweep(store.data, nsamples, zstd_levels, 64)
        elif isinstance(store, Prometheus):
            whole = du(store.data)
            out["wal_and_head_disk_bytes"] = whole["disk"] - size["disk"]
        elif isinstance(store, VictoriaMetrics):
            out["breakdown"] = du_by(store.data, lambda rel: rel.split("/")[0] + "/" +
                                     (rel.split("/")[1] if "/" in rel else ""))
        return out
    except Exception as e:
        raise RuntimeError(f"{store.name}: {e}\n{store.logtail()}") from e
    finally:
        store.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="ingest,real")
    ap.add_argument("--series", type=int, default=2000, help="series of the ingest dataset")
    ap.add_argument("--shards", type=int, default=64, help="m3shm shards (daemon default 64)")
    ap.add_argument("--real", type=Path, default=default_dataset())
    ap.add_argument("--stores", default="m3shm,victoria-metrics,prometheus")
    ap.add_argument("--zstd-levels", default="1,3,6,9,19",
                    help="zstd levels to try on m3shm's flushed data ('' for none)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directories")
    a = ap.parse_args()
    b0 = target_block()
    levels = [int(x) for x in a.zstd_levels.split(",") if x]
    result: dict = {"block_start_ms": b0, "m3shm_shards": a.shards}
    for name in a.datasets.split(","):
        ds = ingest_dataset(a.series, b0) if name == "ingest" else real_dataset(a.real, b0)
        nsamples = sum(len(t) for t in ds[1])
        bodies = slice_bodies(ds, SLICE_MS)
        entry: dict = {"series": len(ds[0]), "samples": nsamples, "requests": len(bodies),
                       "payload_bytes": sum(map(len, bodies))}
        tmp = Path(tempfile.mkdtemp(prefix=f"m3shm-disk-{name}-"))
        try:
            for sname in a.stores.split(","):
                d = tmp / sname
                d.mkdir()
                if sname == "m3shm":
                    store: Store = M3shm(d, shards=a.shards)
                    args: tuple = ()
                elif sname == "victoria-metrics":
                    store, args = VictoriaMetrics(d), (months(ds[1]),)
                else:
                    store, args = Prometheus(d), ()
                entry[sname] = run_store(store, bodies, nsamples, args,
                                         levels if sname == "m3shm" else None)
            if "m3shm" in entry and "victoria-metrics" in entry:
                entry["m3shm_over_vm"] = round(entry["m3shm"]["disk_bytes"] /
                                               entry["victoria-metrics"]["disk_bytes"], 3)
        finally:
            if a.keep:
                entry["dir"] = str(tmp)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        result[name] = entry
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
