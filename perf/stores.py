"""The stores the storage benchmarks run (perf/disk.py, perf/recovery.py): m3shm, VictoriaMetrics
and Prometheus as real subprocesses on 127.0.0.1 in temporary directories, plus the payloads
they are fed and ``du``. Not a test and not part of the package.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import snappy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from m3shm.proto import remote_pb2  # noqa: E402

VM_BIN = "/usr/bin/victoria-metrics"
PROM_BIN = "/usr/bin/prometheus"
REPO = Path(__file__).resolve().parent.parent

# A dataset to feed: label dicts, and per series its timestamps (ms) and values.
Dataset = tuple[list[dict[str, str]], list[np.ndarray], list[np.ndarray]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def du(path: Path) -> dict[str, int]:
    """Bytes of a directory tree: allocated on disk (what ``du -s`` counts, file system blocks)
    and apparent (``du -sb``: the sum of file sizes), walked once, each inode counted once."""
    disk = apparent = 0
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue  # removed while we walked (a merge, a trim)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if name in files:
                disk += st.st_blocks * 512
                apparent += st.st_size
    return {"disk": disk, "apparent": apparent}


def du_by(path: Path, classify) -> dict[str, dict[str, int]]:
    """du per class of file: ``classify(relative path) -> class name``."""
    out: dict[str, dict[str, int]] = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            c = out.setdefault(classify(os.path.relpath(p, path)),
                               {"files": 0, "disk": 0, "apparent": 0})
            c["files"] += 1
            c["disk"] += st.st_blocks * 512
            c["apparent"] += st.st_size
    return out


def wait_http(url: str, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s")


def http_call(url: str, method: str = "GET", body: bytes | None = None,
              timeout: float = 600) -> bytes:
    req = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


# -- payloads --------------------------------------------------------------------------------

def slice_bodies(ds: Dataset, slice_ms: int) -> list[bytes]:
    """Snappy remote-write 1.0 bodies in time order: each holds every series' samples of one
    ``slice_ms`` window (so a receiver sees time advance as a scraper would send it)."""
    labels, tss, vss = ds
    lo = min(int(t[0]) for t in tss if len(t))
    hi = max(int(t[-1]) for t in tss if len(t))
    pairs = [sorted(lab.items()) for lab in labels]
    out = []
    for w0 in range(lo, hi + 1, slice_ms):
        w = remote_pb2.WriteRequest()
        for pl, ts, vs in zip(pairs, tss, vss, strict=True):
            a, b = np.searchsorted(ts, [w0, w0 + slice_ms])
            if a == b:
                continue
            series = w.timeseries.add()
            for k, v in pl:
                lab = series.labels.add()
                lab.name, lab.value = k, v
            for t, v in zip(ts[a:b].tolist(), vs[a:b].tolist(), strict=True):
                s = series.samples.add()
                s.timestamp, s.value = t, v
        if w.timeseries:
            out.append(snappy.compress(w.SerializeToString()))
    return out


def post_bodies(port: int, path: str, bodies: list[bytes], ok: tuple[int, ...] = (200, 204)
                ) -> None:
    """POST every body over one keep-alive connection; any other status is an error."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for b in bodies:
            conn.request("POST", path, b, {"Content-Type": "application/x-protobuf",
                                           "Content-Encoding": "snappy",
                                           "X-Prometheus-Remote-Write-Version": "0.1.0"})
            r = conn.getresponse()
            text = r.read()
            if r.status not in ok:
                raise RuntimeError(f"POST {path} on port {port}: {r.status} {text[:300]!r}")
    finally:
        conn.close()


# -- the stores ------------------------------------------------------------------------------

class Store:
    """A store under test: ``start()``, ``write(bodies)``, ``settle()`` (its steady on-disk
    form), ``measured_dir()`` (what du counts), ``stop()``."""

    name = ""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = tmp / f"{self.name}.log"

    def _spawn(self, args: list[str], env: dict[str, str] | None = None) -> None:
        logf = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        # An installed package has its bytecode compiled; a shell that forbids writing it
        # would make every start recompile the sources and time that instead.
        full = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT,
                                     env={**full, **(env or {})})
        logf.close()

    def stop(self, timeout: float = 120) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logtail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-3000:]
        return ""


M3SHM_CONFIG = """shards: {shards}
workers: {workers}
shm:
  arena_bytes: {arena}
  series_per_shard: {series_per_shard}
  lane_bytes: 4MiB
flush:
  interval: 1h
"""


class M3shm(Store):
    name = "m3shm"

    def __init__(self, tmp: Path, shards: int = 64, workers: int = 2, arena: str = "16MiB",
                 series_per_shard: int = 16384, extra: str = "") -> None:
        super().__init__(tmp)
        self.data = tmp / "m3shm-data"
        self.cfg = tmp / "m3shm.yaml"
        self.cfg.write_text(M3SHM_CONFIG.format(shards=shards, workers=workers, arena=arena,
                                                series_per_shard=series_per_shard) + extra)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> M3shm:
        self._spawn([sys.executable, "-c", "import sys; from m3shm.cli import main; "
                     "sys.exit(main())", "serve", "-c", str(self.cfg), "--data",
                     str(self.data), "--listen", f"127.0.0.1:{self.port}"],
                    env={"PYTHONPATH": str(REPO)})
        if wait:
            wait_http(self.url + "/ready", 600, self.proc)
        return self

    def write(self, bodies: list[bytes]) -> None:
        post_bodies(self.port, "/api/v1/write", bodies)

    def settle(self) -> None:
        """Flush every closed block (POST /api/v1/admin/flush answers once durable)."""
        http_call(self.url + "/api/v1/admin/flush", "POST", b"")

    def measured_dir(self) -> Path:
        return self.data

    def stop(self, timeout: float = 120) -> None:
        super().stop(timeout)
        from m3shm.stats import stats_path
        from m3shm.supervisor import applied_config_path, segment_path
        from m3shm.workers.nsruntime import aggregated_segment_glob

        seg = segment_path(str(self.data))
        aggs = glob.glob(aggregated_segment_glob(str(self.data)))
        for p in (seg, stats_path(seg), applied_config_path(stats_path(seg)), *aggs):
            with contextlib.suppress(FileNotFoundError):  # left behind only after a kill
                os.unlink(p)


def classify_m3shm(rel: str) -> str:
    """Where m3shm's bytes go: fileset file kinds, the reverse index, commit log, the rest."""
    parts = rel.split(os.sep)
    if parts[0] == "filesets" and parts[-1].startswith("fileset-"):
        return "fileset_" + parts[-1].rsplit("-", 1)[1].split(".")[0]
    if parts[0] == "commitlog":
        return "commitlog"
    return "other:" + parts[0]


class VictoriaMetrics(Store):
    name = "victoria-metrics"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.data = tmp / "vm-data"
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> VictoriaMetrics:
        self._spawn([VM_BIN, f"-storageDataPath={self.data}", "-retentionPeriod=100y",
                     f"-httpListenAddr=127.0.0.1:{self.port}", "-loggerLevel=ERROR"])
        wait_http(self.url + "/health", 60, self.proc)
        return self

    def write(self, bodies: list[bytes]) -> None:
        post_bodies(self.port, "/api/v1/write", bodies)

    def settle(self, months: list[str] | None = None) -> None:
        """Flush in-memory parts, force-merge the data's partitions, and wait until the
        directory stops changing (the merge runs in the background)."""
        http_call(self.url + "/internal/force_flush")
        for m in months or []:
            http_call(self.url + f"/internal/force_merge?partition_prefix={m}")
        stable, last = 0, None
        while stable < 6:
            time.sleep(0.5)
            now = du(self.data)["apparent"]
            stable = stable + 1 if now == last else 0
            last = now

    def measured_dir(self) -> Path:
        return self.data


PROM_CONFIG = "global:\n  scrape_interval: 1h\n"


class Prometheus(Store):
    name = "prometheus"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.data = tmp / "prom-data"
        self.cfg = tmp / "prometheus.yml"
        self.cfg.write_text(PROM_CONFIG)
        self.url = f"http://127.0.0.1:{self.port}"
        self.block: Path | None = None

    def start(self) -> Prometheus:
        self._spawn([PROM_BIN, f"--config.file={self.cfg}", f"--storage.tsdb.path={self.data}",
                     f"--web.listen-address=127.0.0.1:{self.port}",
                     "--web.enable-remote-write-receiver", "--web.enable-admin-api",
                     "--storage.tsdb.retention.time=100y", "--log.level=warn"])
        wait_http(self.url + "/-/ready", 60, self.proc)
        return self

    def write(self, bodies: list[bytes]) -> None:
        post_bodies(self.port, "/api/v1/write", bodies)

    def settle(self) -> None:
        """Cut the head into a persistent block: the TSDB snapshot API writes the head (which
        otherwise lives only in the WAL and head chunks until it spans 3 h) with the compactor
        that cuts every 2 h block, into ``snapshots/<name>/<block ulid>/``."""
        out = json.loads(http_call(self.url + "/api/v1/admin/tsdb/snapshot?skip_head=false",
                                   "POST", b""))
        self.block = self.data / "snapshots" / out["data"]["name"]

    def measured_dir(self) -> Path:
        assert self.block is not None, "settle() first"
        return self.block
