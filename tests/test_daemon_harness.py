"""Harness for the daemon tests (no tests here): start `m3shm serve` as a real subprocess on
127.0.0.1 with a small config, talk HTTP to it, find and kill its processes."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import snappy

from m3shm.proto import remote_pb2

SMALL = """
shards: 8
workers: {workers}
shm:
  lane_bytes: {lane}
  series_per_shard: {series}
  arena_bytes: {arena}
commitlog:
  fsync: {fsync}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now_ms() -> int:
    return int(time.time() * 1000)


Labels = dict[str, str] | list[tuple[str, str]]


def write_request(series: list[tuple[Labels, list[tuple[int, float]]]]) -> bytes:
    """An uncompressed remote write 1.0 body. Labels as a list of pairs keep their order and
    may repeat a name (for the decoder's validation tests)."""
    w = remote_pb2.WriteRequest()
    for labels, samples in series:
        ts = w.timeseries.add()
        for k, v in (labels.items() if isinstance(labels, dict) else labels):
            lab = ts.labels.add()
            lab.name, lab.value = k, v
        for t, v in samples:
            s = ts.samples.add()
            s.timestamp, s.value = t, v
    return w.SerializeToString()


RUNNING: set[Daemon] = set()  # started and not yet stopped: conftest kills what a test leaves


class Daemon:
    def __init__(self, tmp: Path, workers: int = 2, series: int = 4096, arena: str = "2MiB",
                 fsync: str = "every_batch", extra: str = "", lane: str = "256KiB") -> None:
        self.data = tmp / "data"
        self.cfg = tmp / "m3shm.yaml"
        self.cfg.write_text(SMALL.format(workers=workers, series=series, arena=arena,
                                         fsync=fsync, lane=lane) + extra)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True, env: dict[str, str] | None = None,
              preexec_fn: Callable[[], None] | None = None) -> Daemon:
        """Start the daemon; ``env`` adds variables to this process's environment."""
        logf = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from m3shm.cli import main; sys.exit(main())",
             "serve", "-c", str(self.cfg), "--data", str(self.data), "--listen",
             f"127.0.0.1:{self.port}"], stdout=logf, stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env else None, preexec_fn=preexec_fn)
        logf.close()
        RUNNING.add(self)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.logtext()}")
            try:
                if self.get("/ready")[0] == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready after {timeout}s:\n{self.logtext()}")

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def workers(self) -> list[int]:
        assert self.proc is not None
        pid = self.proc.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except FileNotFoundError:
            return []

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        RUNNING.discard(self)
        self.remove_shm()
        return code

    def remove_shm(self) -> None:
        """Unlink the shared-memory files of this daemon's data directory (a clean stop
        removes them itself; a killed daemon leaves them behind)."""
        from m3shm.stats import stats_path
        from m3shm.supervisor import applied_config_path, segment_path
        from m3shm.workers.nsruntime import aggregated_segment_glob

        seg = segment_path(str(self.data))
        from m3shm.aggstore import store_path

        aggs = glob.glob(aggregated_segment_glob(str(self.data)))
        vols = [p + ".vol" for p in (seg, *aggs)]  # volume pointers (docs/formats/volptr.md)
        for p in (seg, store_path(seg), stats_path(seg), applied_config_path(stats_path(seg)),
                  *aggs, *vols):
            with contextlib.suppress(FileNotFoundError):  # left behind only by a killed daemon
                os.unlink(p)

    def reap(self) -> None:
        """Kill whatever of this daemon is still running (a test that failed before stopping
        it) and remove its shared memory: nothing outlives the test that started it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.kill_all()
        RUNNING.discard(self)
        with contextlib.suppress(Exception):
            self.remove_shm()

    def kill_all(self) -> None:
        """SIGKILL the supervisor and every worker at once."""
        assert self.proc is not None
        pids = self.workers()
        os.kill(self.proc.pid, signal.SIGKILL)
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids):
            assert time.monotonic() < deadline
            time.sleep(0.01)

    # -- HTTP --------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None,
             timeout: float = 30) -> tuple[int, bytes, dict[str, str]]:
        h = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
             "X-Prometheus-Remote-Write-Version": "0.1.0"}
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=body, headers=h, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def write(self, series, path: str = "/api/v1/prom/remote/write", timeout: float = 30):
        return self.post(path, snappy.compress(write_request(series)), timeout=timeout)

    def export(self, match: str, start: str = "", end: str = "") -> list[dict]:
        q = urllib.parse.urlencode([("match[]", match), ("start", start), ("end", end)])
        code, body = self.get(f"/api/v1/export?{q}")
        assert code == 200, body
        return [parse_export_line(line) for line in body.decode().splitlines() if line]

    def export_map(self, match: str) -> dict[tuple, dict[int, float]]:
        out = {}
        for row in self.export(match):
            key = tuple(sorted(row["metric"].items()))
            out[key] = dict(zip(row["timestamps"], row["values"], strict=True))
        return out


_BARE_INF = re.compile(r"(?<=[\[,])([+-])Inf(?=[,\]])")


def parse_export_line(line: str) -> dict:
    """One line of VictoriaMetrics' export format: JSON except that the values array holds
    bare NaN, +Inf and -Inf (Python's json reads NaN but spells infinity 'Infinity')."""
    return json.loads(_BARE_INF.sub(lambda m: "-Infinity" if m.group(1) == "-" else "Infinity",
                                    line))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
