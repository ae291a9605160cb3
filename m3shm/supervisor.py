"""The supervisor: owns the data directory and the shared segment, forks and restarts workers.

Start-up, all before any thread or event loop exists (fork hygiene; numpy is never imported
here): lock ``<data>/LOCK`` with flock (a second daemon, or a worker orphaned by a previous
one, makes start-up wait and then fail with a message naming the holder); check or write
``<data>/meta.json`` (shard count and hash function are fixed for the life of the data);
create the segment ``/dev/shm/m3shm-<hash of the data path>.seg``; fork one worker per core.
Workers replay the commit logs of earlier boots into their own shards themselves.

Running: a worker that exits for any reason is forked again on the same index (same shard
range, same lanes) with a new incarnation number; it re-attaches to the segment it inherits.
SIGTERM/SIGINT: forward SIGTERM to every worker, wait for them (they finish in-flight requests,
make everything durable and drain), unlink the segment, exit 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time

from m3shm.config import Config, ConfigError
from m3shm.shm import Segment, SegParams, seq_base_now
from m3shm.storage import commitlog

log = logging.getLogger("m3shm.supervisor")

HASH_NAME = "m3hash64-v1"


def lock_data_dir(data: str, wait_s: float = 10.0) -> int:
    fd = os.open(os.path.join(data, "LOCK"), os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                raise ConfigError(f"data_dir: {data} is locked by another m3shm process "
                                  f"(pid {holder or '?'})") from None
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


FILESETS_DIR = "filesets"


def _has_data(data: str, ns: str, raw: bool) -> bool:
    nsdir = os.path.join(data, FILESETS_DIR, ns)
    if os.path.isdir(nsdir) and any(os.scandir(nsdir)):
        return True
    return raw and bool(commitlog.list_files(os.path.join(data, "commitlog")))


def check_meta(data: str, cfg: Config) -> None:
    """Check (or first write) ``<data>/meta.json``: the shard count, the series hash and each
    namespace's block size are fixed once a namespace has data; a change is refused with an
    error naming the key. Namespaces without data may be added or changed freely."""
    path = os.path.join(data, "meta.json")
    have: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        if have.get("shards") != cfg.shards:
            raise ConfigError(f"shards: the data in {data} was written with shards="
                              f"{have.get('shards')}; it cannot change (configured "
                              f"{cfg.shards})")
        if have.get("hash") != HASH_NAME:
            raise ConfigError(f"data_dir: {data} uses series hash {have.get('hash')!r}, this "
                              f"build knows {HASH_NAME!r}")
    recorded = have.get("namespaces", {})
    nss = {}
    for i, ns in enumerate(cfg.namespaces):
        old = recorded.get(ns.name)
        if (old and old.get("blockSize") != ns.block_size_ms
                and _has_data(data, ns.name, not ns.aggregated)):
            raise ConfigError(
                f"namespaces[{i}].blockSize: namespace {ns.name!r} holds data written with "
                f"blockSize={old.get('blockSize')}ms; it cannot change (configured "
                f"{ns.block_size_ms}ms). Use a new namespace, or remove its data")
        nss[ns.name] = {"blockSize": ns.block_size_ms, "resolution": ns.resolution_ms}
    for name, old in recorded.items():  # keep what is on disk for namespaces not configured
        nss.setdefault(name, old)
    want = {"format": 1, "shards": cfg.shards, "hash": HASH_NAME, "namespaces": nss}
    if want == have:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(want, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def segment_path(data: str) -> str:
    h = hashlib.sha1(os.path.realpath(data).encode()).hexdigest()[:12]
    return f"/dev/shm/m3shm-{h}.seg"


class Supervisor:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.data = os.path.abspath(cfg.data_dir)
        self.nworkers = cfg.num_workers()
        self.pids: dict[int, int] = {}          # pid -> worker index
        self.incarnation = [0] * self.nworkers
        self.stopping = False
        self.restarts: list[float] = []

    def run(self) -> int:
        os.makedirs(os.path.join(self.data, "commitlog"), exist_ok=True)
        self.lock_fd = lock_data_dir(self.data)
        check_meta(self.data, self.cfg)
        self.boot = commitlog.next_boot(os.path.join(self.data, "commitlog"))
        c = self.cfg
        params = SegParams(num_shards=c.shards, num_producers=self.nworkers,
                           lane_bytes=c.shm.lane_bytes, series_per_shard=c.shm.series_per_shard,
                           arena_bytes=c.shm.arena_bytes, block_ms=c.raw_namespace.block_size_ms,
                           seq_base=seq_base_now())
        path = segment_path(self.data)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a previous boot's segment: its data is in the commit logs
        st = os.statvfs(os.path.dirname(path))
        if st.f_bavail * st.f_frsize < params.size():
            raise ConfigError(
                f"shm.arena_bytes: the segment needs {params.size() >> 20} MiB "
                f"(shards x (arena_bytes + series tables) + lanes) but "
                f"{os.path.dirname(path)} has {st.f_bavail * st.f_frsize >> 20} MiB free; "
                "lower shm.arena_bytes / shm.series_per_shard / shm.lane_bytes or enlarge it")
        self.seg = Segment.create(path, params)
        log.info("m3shm supervisor pid %d: boot %d, %d workers, %d shards, segment %s (%d MiB)",
                 os.getpid(), self.boot, self.nworkers, c.shards, self.seg.path,
                 params.size() >> 20)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            for i in range(self.nworkers):
                self._spawn(i)
            return self._loop()
        finally:
            self.seg.unlink()

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _spawn(self, index: int) -> None:
        # fork hygiene: no threads, no event loop, no numpy in the process that forks
        if threading.active_count() > 1 or "numpy" in sys.modules or "uvloop" in sys.modules:
            raise RuntimeError("supervisor must stay single-threaded without numpy/uvloop "
                               f"before fork (threads={threading.active_count()})")
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                from m3shm.workers.worker import worker_main

                code = worker_main(self.cfg, self.seg, index, self.boot,
                                   self.incarnation[index], self.data, parent)
            except BaseException:
                log.exception("worker %d crashed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self.pids[pid] = index
        self.incarnation[index] += 1

    def _loop(self) -> int:
        forwarded = False
        deadline = 0.0
        while True:
            if self.stopping and not forwarded:
                log.info("supervisor: stopping %d workers", len(self.pids))
                for pid in self.pids:
                    with _suppress():
                        os.kill(pid, signal.SIGTERM)
                forwarded = True
                deadline = time.monotonic() + 90
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if pid:
                index = self.pids.pop(pid, None)
                if index is not None and not self.stopping:
                    log.warning("worker %d (pid %d) exited (%s); restarting", index, pid,
                                _describe(status))
                    self._throttle()
                    self._spawn(index)
                continue
            if forwarded and not self.pids:
                log.info("supervisor: all workers stopped")
                return 0
            if forwarded and time.monotonic() > deadline:
                log.error("supervisor: workers did not stop in time; killing them")
                for p in self.pids:
                    with _suppress():
                        os.kill(p, signal.SIGKILL)
                return 1
            time.sleep(0.02)

    def _throttle(self) -> None:
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 10] + [now]
        if len(self.restarts) > 10:
            time.sleep(1.0)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError)  # type: ignore


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


def serve(cfg: Config) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    try:
        return Supervisor(cfg).run()
    except ConfigError as e:
        log.error("%s", e)
        return 2
