"""SIGKILL every daemon process at random points of an admin flush (several trials, data and
cold overwrites accumulating in one data directory): after each restart no acknowledged
sample is lost, every fileset on disk is complete and verifies, and no file of an unfinished
flush is left for a reader to see."""

from __future__ import annotations

import random
import threading

from test_daemon_harness import Daemon, now_ms

from m3shm.storage.fileset import COMPLETE_KINDS, Fileset, list_filesets

BLOCK = 2000
CFG = """
namespaces:
  - {name: default, retention: 1h, blockSize: 2s, bufferPast: 1s, bufferFuture: 1s}
flush: {interval: 1h}
"""


def test_sigkill_during_flush_loses_nothing(tmp_path):
    rnd = random.Random(5)
    d = Daemon(tmp_path, series=8192, arena="8MiB", extra=CFG).start()
    want: dict = {}
    root = d.data / "filesets"
    try:
        for trial in range(4):
            now = now_ms()
            starts = [now - now % BLOCK - BLOCK * k for k in range(2, 8)]
            series = []
            for i in range(400):
                lab = {"__name__": "cr", "i": str(i)}
                smp = [(bs + 10 * j + i % 7, float(trial * 1000 + i + j)) for bs in starts
                       for j in range(3)]  # later trials overwrite earlier timestamps
                series.append((lab, smp))
            for k in range(0, len(series), 100):
                code, body, _ = d.write(series[k : k + 100])
                assert code == 204, body
                for lab, smp in series[k : k + 100]:
                    want.setdefault(tuple(sorted(lab.items())), {}).update(dict(smp))
            answers: list = []

            def flush(answers: list = answers) -> None:
                try:
                    answers.append(d.post("/api/v1/admin/flush", b"")[0])
                except OSError as e:  # the daemon was killed before it answered
                    answers.append(e)

            t = threading.Thread(target=flush, daemon=True)
            t.start()
            delay = rnd.uniform(0.0, 0.6)
            t.join(delay)
            d.kill_all()
            t.join(30)
            done = len(list_filesets(root))
            print(f"trial {trial}: killed after {delay:.3f}s, flush answered {answers}, "
                  f"{done} filesets complete")
            d.start()
            assert d.export_map("cr") == want, f"trial {trial}, killed after {delay:.3f}s"
            for fid in list_filesets(root):
                with Fileset(root, fid) as fs:
                    fs.verify()
            # complete: version 4's renamed file (or versions 1-3's checkpoint)
            done_names = {p.name.rsplit("-", 1)[0] for p in root.glob("*/*/fileset-*.db")
                          if p.name.rsplit("-", 1)[1][:-3] in COMPLETE_KINDS}
            stray = [p for p in root.glob("*/*/fileset-*")
                     if p.name.rsplit("-", 1)[0] not in done_names or p.suffix == ".tmp"]
            assert not stray, stray
        code, body = d.post("/api/v1/admin/flush", b"")[:2]
        assert code == 200, body
        assert d.export_map("cr") == want
    finally:
        assert d.stop() == 0
    d.start()
    try:
        assert d.export_map("cr") == want
    finally:
        assert d.stop() == 0
