"""Fileset reads per version: CPU per point lookup (bloom -> summaries -> index -> data) and
per series of a full scan, for the same series written as version 2 and version 3 filesets.

Series: ``--series`` node-exporter-like label sets with 1-50 random samples each (the series
of tests/test_fileset.py), one fileset, summary groups of 64. Lookups visit every 7th series
in insertion order (not id order, so consecutive lookups rarely share a frame); the scan
iterates the whole fileset. Timed with the thread's CPU clock (the machine is shared), median
of ``--runs`` fresh opens; also the fileset's bytes on disk (apparent). Usage:
``.venv/bin/python perf/fileset_lookup.py [--series N] [--runs R]``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_fileset import BLOCK, START, make_series  # noqa: E402

from m3shm.storage.fileset import Fileset, FilesetId, write_fileset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--series", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    series = make_series(args.series, seed=3)
    probes = series[::7]
    out: dict = {"series": args.series, "lookups": len(probes), "versions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for version in (2, 3):
            root = Path(tmp) / f"v{version}"
            fid = FilesetId("default", 0, START, 0)
            write_fileset(root, fid, BLOCK, series, version=version)
            gets, scans = [], []
            for _ in range(args.runs):
                with Fileset(root, fid) as fs:
                    t0 = time.thread_time_ns()
                    for sid, h, _ in probes:
                        assert fs.get(sid, h) is not None
                    t1 = time.thread_time_ns()
                    n = sum(1 for _ in fs)
                    t2 = time.thread_time_ns()
                gets.append((t1 - t0) / len(probes))
                scans.append((t2 - t1) / n)
            out["versions"][str(version)] = {
                "lookup_cpu_us": round(statistics.median(gets) / 1000, 1),
                "scan_cpu_us_per_series": round(statistics.median(scans) / 1000, 2),
                "apparent_bytes": sum(p.stat().st_size for p in root.rglob("*.db"))}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
