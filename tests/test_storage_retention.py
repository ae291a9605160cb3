"""Retention through a daemon with a 12-second retention: a flush pass deletes exactly the
filesets (every volume and file, the reverse index too) whose block ended at or before the
pass's now - retention, and export stops returning exactly their samples."""

from __future__ import annotations

import json
import time

from test_daemon_harness import Daemon, now_ms

from m3shm.storage.fileset import list_filesets

BLOCK, RETENTION = 2000, 12_000
CFG = """
namespaces:
  - {name: default, retention: 12s, blockSize: 2s, bufferPast: 1s, bufferFuture: 1s}
flush: {interval: 1h, retention_interval: 1ms}
"""


def flush_at_mid_block(d: Daemon) -> tuple[int, int]:
    """Flush when now - retention is well inside a block (no pass can straddle a block
    boundary); returns the passes' earliest and latest wall clock."""
    while not 400 <= (now_ms() - RETENTION) % BLOCK <= 1200:
        time.sleep(0.02)
    code, body = d.post("/api/v1/admin/flush", b"")[:2]
    assert code == 200, body
    ms = [json.loads(p.read_text())["pass_ms"] for p in (d.data / "flush").glob("state-*.json")]
    return min(ms), max(ms)


def test_retention_deletes_exactly_expired_blocks(tmp_path):
    d = Daemon(tmp_path, extra=CFG).start()
    root = d.data / "filesets"
    try:
        now = now_ms()
        starts = [now - now % BLOCK - BLOCK * k for k in range(2, 6)]  # 4 closed blocks
        series = [({"__name__": "r", "i": str(i)},
                   [(bs + 50 + i, float(i)) for bs in starts]) for i in range(16)]
        code, body, _ = d.write(series)
        assert code == 204, body
        lo, hi = flush_at_mid_block(d)
        # cold overwrite: that block's volume 1 replaces volume 0
        code, body, _ = d.write([({"__name__": "r", "i": "0"}, [(starts[1] + 50, 9.0)])])
        assert code == 204, body
        lo, hi = flush_at_mid_block(d)
        all_blocks = {f.block_start for f in list_filesets(root)}
        assert all_blocks == set(starts) - {bs for bs in starts
                                            if bs + BLOCK <= lo - RETENTION}
        for _ in range(3):  # blocks expire one after another
            time.sleep(BLOCK / 1000)
            lo, hi = flush_at_mid_block(d)
            left = {f.block_start for f in list_filesets(root)}
            assert left == {bs for bs in all_blocks if bs + BLOCK > hi - RETENTION}
            assert left == {bs for bs in all_blocks if bs + BLOCK > lo - RETENTION}
            files = {int(p.name.split("-")[1]) for p in root.glob("*/*/fileset-*")}
            assert files == left, "every file of an expired block is deleted"
            got = d.export_map("r")
            assert {t - t % BLOCK for v in got.values() for t in v} == left
            for (_, (_, i)), smp in got.items():
                assert smp == {bs + 50 + int(i): 9.0 if (i == "0" and bs == starts[1])
                               else float(i) for bs in left}
    finally:
        assert d.stop() == 0
