"""The supervisor: owns the data directory and the shared segment, forks and restarts workers.

Start-up, all before any thread or event loop exists (fork hygiene; numpy is never imported
here): lock ``<data>/LOCK`` with flock (a second daemon, or a worker orphaned by a previous
one, makes start-up wait and then fail with a message naming the holder); check or write
``<data>/meta.json`` (shard count and hash function are fixed for the life of the data);
create one segment per namespace (the raw one ``/dev/shm/m3shm-<hash of the data path>.seg``,
each aggregated one ``…-ns-<name>.seg``: m3shm/workers/nsruntime.py); fork one worker per core.
Workers replay the commit logs of earlier boots (one directory per namespace) into their own
shards themselves.

Running: a worker that exits for any reason is forked again on the same index (same shard
range, same lanes) with a new incarnation number; it re-attaches to the segment it inherits.
SIGTERM/SIGINT: forward SIGTERM to every worker, wait for them (they finish in-flight requests,
make everything durable and drain), unlink the segment, exit 0.

systemd and health (m3shm/systemd.py, m3shm/stats.py): the supervisor also creates the stats
file beside the segment, where every worker beats (its event loop, every HEARTBEAT_S, and only
while its drain thread makes progress) and counts. The loop sends READY=1 once every worker
serves (recovery done), WATCHDOG=1 every WATCHDOG_USEC/2 only while every worker's heartbeat is
younger than HEARTBEAT_STALE_S (a hung or stopped worker stops the pings, so systemd's watchdog
fires), STOPPING=1 at SIGTERM.

SIGHUP: re-read and validate the YAML file (with the same command-line overrides). A bad file
is logged and the running config kept. Otherwise the live keys (config.LIVE_SECTIONS/LIVE_KEYS:
limits, the ingest window and back-pressure knobs) take the new values, every other changed key
is named in the log as needing a restart, the applied config is written beside the stats file
and its generation bumped, and the workers are sent SIGHUP to load it. RELOADING=1 goes out
first; READY=1 once every worker reports the new generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pickle
import signal
import sys
import threading
import time

from m3shm import shmbudget
from m3shm import stats as sf
from m3shm.aggstore import AggStore
from m3shm.atomicfile import replace_json
from m3shm.config import Config, ConfigError, NamespaceConfig, live_update, load
from m3shm.rules import versions
from m3shm.shm import Segment, SegParams, seq_base_now
from m3shm.storage import commitlog
from m3shm.storage.volptr import VolumePointers, table_path
from m3shm.systemd import Notifier
from m3shm.workers import nsruntime
from m3shm.workers.watermark import fix_replay_watermark

log = logging.getLogger("m3shm.supervisor")

HASH_NAME = "m3hash64-v1"
HEARTBEAT_STALE_S = 2.0      # a worker whose last beat is older is not healthy
FORK_BLOCKED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
RELOAD_WAIT_S = 10.0         # how long READY=1 after a reload waits for the workers


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


def _has_data(data: str, ns: NamespaceConfig) -> bool:
    nsdir = os.path.join(data, FILESETS_DIR, ns.name)
    if os.path.isdir(nsdir) and any(os.scandir(nsdir)):
        return True
    files = commitlog.list_files(nsruntime.commitlog_dir(data, ns))
    if not ns.aggregated:
        return bool(files)
    return any(commitlog.first_seq(p) is not None for p in files)


def check_meta(data: str, cfg: Config) -> None:
    """Check (or first write) ``<data>/meta.json``: the shard count, the series hash and each
    namespace's block size are fixed once a namespace has data (filesets, or commit-log
    batches: the raw namespace counts any commit-log file); a change is refused with an error
    naming the key. Namespaces without data may be added or changed freely."""
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
                and _has_data(data, ns)):
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
    replace_json(path, want)


def segment_path(data: str) -> str:
    """The raw namespace's segment (aggregated ones: nsruntime.segment_path)."""
    return nsruntime.segment_path(data)


def applied_config_path(stats_file: str) -> str:
    """Where the supervisor leaves the config the workers must apply: a pickle of
    ``(generation, Config)``, mode 0600, written only by the supervisor and read only by its
    own workers (the same user)."""
    return os.path.splitext(stats_file)[0] + ".config.pickle"


def write_applied_config(path: str, generation: int, cfg: Config) -> None:
    tmp = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        pickle.dump((generation, cfg), f)
    os.rename(tmp, path)


class Supervisor:
    def __init__(self, cfg: Config, config_path: str | None = None,
                 overrides: dict[str, object] | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.notifier = Notifier()
        self.reload_requested = False
        self.reload_pending: tuple[int, float] | None = None  # (generation, deadline)
        self.ready_sent = False
        self.data = os.path.abspath(cfg.data_dir)
        self.nworkers = cfg.num_workers()
        self.pids: dict[int, int] = {}          # pid -> worker index
        self.incarnation = [0] * self.nworkers
        self.stopping = False
        self.restarts: list[float] = []

    def seg_params(self, i: int, ns: NamespaceConfig) -> SegParams:
        """Parameters of namespace ``i``'s segment: shards, producers and lanes shared by all,
        its own write window, block size and (for aggregated ones) the agg_* sizes."""
        c = self.cfg
        return SegParams(num_shards=c.shards, num_producers=self.nworkers,
                         lane_bytes=c.shm.lane_bytes,
                         series_per_shard=(c.shm.agg_series_per_shard if ns.aggregated
                                           else c.shm.series_per_shard),
                         arena_bytes=(c.shm.agg_arena_bytes if ns.aggregated
                                      else c.shm.arena_bytes),
                         block_ms=ns.block_size_ms, seq_base=seq_base_now(),
                         buffer_past_ms=ns.buffer_past_ms, buffer_future_ms=ns.buffer_future_ms,
                         retention_ms=ns.retention_ms, cold_writes=ns.cold_writes, ns_id=i)

    def _create_segments(self) -> None:
        """One segment per namespace (previous boots' are replaced: their data is in the
        commit logs); ``self.seg`` is the raw one."""
        import glob

        c = self.cfg
        for p in glob.glob(nsruntime.aggregated_segment_glob(self.data)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)  # also those of namespaces no longer configured
        from m3shm.aggstore import store_path

        plan = [(nsruntime.segment_path(self.data, ns), self.seg_params(i, ns), ns)
                for i, ns in enumerate(c.namespaces)]
        path = segment_path(self.data)
        for p in [path] + [store_path(p) for p, _, _ in plan]:  # their space counts as free
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        self.segs: dict[str, Segment] = {}
        self.volptrs: list[VolumePointers] = []
        try:
            for p, params, ns in plan:  # sparse: creating one touches only its header pages
                self.segs[ns.name] = Segment.create(p, params)
            # what /dev/shm must hold (m3shm/shmbudget.py): refuse below the working set
            budget = shmbudget.of_segments(list(self.segs.values()), c.shm.cell_arena())
            warning = shmbudget.check(budget, os.path.dirname(path))
            if warning:
                log.warning("%s", warning)
            for p, _, ns in plan:
                # readers find the newest fileset volumes here (m3shm/storage/volptr.py)
                self.volptrs.append(VolumePointers.create(
                    table_path(p), c.shards, ns.retention_ms, ns.block_size_ms))
        except BaseException:
            self._unlink_segments()
            raise
        self.seg = self.segs[c.raw_namespace.name]
        self.seg_bytes = budget.reserved

    def _unlink_segments(self) -> None:
        from m3shm.aggstore import store_path

        for seg in getattr(self, "segs", {}).values():
            seg.unlink()
            if seg is not getattr(self, "seg", None):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(store_path(seg.path))  # its group cells' store
        for t in getattr(self, "volptrs", []):
            t.unlink()

    def run(self) -> int:
        for ns in self.cfg.namespaces:
            os.makedirs(nsruntime.commitlog_dir(self.data, ns), exist_ok=True)
        self.lock_fd = lock_data_dir(self.data)
        check_meta(self.data, self.cfg)
        self._start_rules()
        # boots are numbered across every namespace's commit-log directory, also those of
        # namespaces no longer configured (their files keep their boots for a later return)
        dirs = {nsruntime.commitlog_dir(self.data, ns) for ns in self.cfg.namespaces}
        for d in sorted(set(nsruntime.all_commitlog_dirs(self.data)) - dirs):
            if commitlog.list_files(d):
                log.warning("commit log %s belongs to a namespace that is not configured: "
                            "kept, not replayed (configure the namespace again to replay "
                            "it, or remove the directory)", d)
        self.boot = max(commitlog.next_boot(d)
                        for d in dirs | set(nsruntime.all_commitlog_dirs(self.data)))
        # the downsampling replay's `now`, once for every worker of this boot
        fix_replay_watermark(self.data, self.boot)
        c = self.cfg
        self._create_segments()
        path = self.seg.path
        try:
            # downsampling cells of the segment's shards (m3shm/aggstore.py): here, so that
            # they outlive a worker killed by SIGKILL
            self.agg_store = AggStore.create(self.seg, c.shm.cell_arena())
            # and of every aggregated segment: the group cells of rollups
            # (m3shm/workers/rollup.py), planned per group series like any cells
            for seg in self.segs.values():
                if seg is not self.seg:
                    AggStore.create(seg, c.shm.cell_arena())
            self.stats = sf.StatsFile.create(sf.stats_path(path), self.nworkers)
        except BaseException:
            self._unlink_segments()
            with contextlib.suppress(AttributeError):
                self.agg_store.unlink()
            raise
        versions.publish(self.stats, self.rules_chain, changed=False)
        log.info("m3shm supervisor pid %d: boot %d, %d workers, %d shards, segment %s and %d "
                 "aggregated (%d MiB reserved in all, segments and stores)", os.getpid(),
                 self.boot, self.nworkers, c.shards, self.seg.path, len(self.segs) - 1,
                 self.seg_bytes >> 20)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.notifier.status(f"recovering: {self.nworkers} workers replaying commit logs")
        # workers signal each other for admin flushes; a child inherits "ignore" until its
        # event loop installs handlers, so an early signal cannot kill it
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        try:
            for i in range(self.nworkers):
                self._spawn(i)
            return self._loop()
        finally:
            self._unlink_segments()
            self.agg_store.unlink()
            self.stats.unlink()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(applied_config_path(self.stats.path))
            self.notifier.close()

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reload_requested = True

    def _spawn(self, index: int) -> None:
        # fork hygiene: no threads, no event loop, no numpy in the process that forks
        if threading.active_count() > 1 or "numpy" in sys.modules or "uvloop" in sys.modules:
            raise RuntimeError("supervisor must stay single-threaded without numpy/uvloop "
                               f"before fork (threads={threading.active_count()})")
        parent = os.getpid()
        # the config the child inherits is the one of this generation
        self.stats.worker(index).set(sf.W_CONFIG_GEN, self.stats.header(sf.H_CONFIG_GEN))
        # block the signals a worker handles until it has installed its own handlers (it
        # unblocks them then): one arriving in between would hit the supervisor's handlers in
        # the child and be lost (a SIGTERM during a restart used to leave the worker running)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED_SIGNALS)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if pid == 0:
            code = 1
            try:
                from m3shm.workers.worker import worker_main

                code = worker_main(self.cfg, self.seg, index, self.boot,
                                   self.incarnation[index], self.data, parent, self.stats,
                                   segs=self.segs)
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
                self.notifier.stopping()
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
                    self.stats.worker(index).add(sf.W_RESTARTS)
                    self._throttle()
                    self._spawn(index)
                continue
            if not forwarded:
                self._tick()
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

    # -- systemd, health, reload ---------------------------------------------------------------
    def _tick(self) -> None:
        """One pass of the loop's housekeeping: readiness, reload, watchdog."""
        if self.reload_requested:
            self.reload_requested = False
            try:
                self._reload()
            except Exception:  # noqa: BLE001 - a reload must never take the daemon down
                log.exception("reload failed; keeping the running config")
                self.notifier.ready(self._status())
        if not self.ready_sent and self._all_workers(lambda w: w.get(sf.W_STATE) ==
                                                     sf.ST_SERVING):
            self.ready_sent = True
            self.stats.set_header(sf.H_READY, 1)
            log.info("supervisor: every worker recovered and serving; ready")
            self.notifier.ready(self._status())
        if self.reload_pending is not None:
            gen, deadline = self.reload_pending
            if self._all_workers(lambda w: w.get(sf.W_CONFIG_GEN) >= gen):
                log.info("reload: config generation %d applied by every worker", gen)
            elif time.monotonic() < deadline:
                return
            else:
                log.warning("reload: not every worker applied config generation %d within "
                            "%.0fs", gen, RELOAD_WAIT_S)
            self.reload_pending = None
            self.notifier.ready(self._status())
        now = time.monotonic()
        if self.notifier.watchdog_due(now) and self.all_fresh():
            self.notifier.watchdog(now)

    def _all_workers(self, pred) -> bool:  # noqa: ANN001
        return len(self.pids) == self.nworkers and all(
            pred(self.stats.worker(i)) for i in self.pids.values())

    def all_fresh(self) -> bool:
        """Every worker is alive and beat within HEARTBEAT_STALE_S."""
        now = sf.monotonic_ms()
        stale = HEARTBEAT_STALE_S * 1000
        return self._all_workers(lambda w: w.get(sf.W_HEARTBEAT_MS) > 0 and
                                 now - w.get(sf.W_HEARTBEAT_MS) <= stale)

    def _status(self) -> str:
        return (f"serving {self.cfg.listen}: {self.nworkers} workers, {self.cfg.shards} "
                f"shards, config generation {self.stats.header(sf.H_CONFIG_GEN)}")

    def _reload(self) -> None:
        self.notifier.reloading()
        log.info("reload: SIGHUP, re-reading %s", self.config_path or "(no config file: "
                 "embedded defaults)")
        try:
            new = self._without_new_namespaces(load(self.config_path, **self.overrides))
            applied, live, fixed = live_update(self.cfg, new)
        except ConfigError as e:
            log.error("reload: %s; keeping the running config", e)
            self.stats.set_header(sf.H_RELOAD_FAILURES,
                                  self.stats.header(sf.H_RELOAD_FAILURES) + 1)
            self.notifier.ready(self._status())
            return
        for what in fixed:
            log.warning("reload: %s cannot change while running; kept the old value "
                        "(restart m3shm to apply it)", what)
        for what in live:
            log.info("reload: %s", what)
        if not live:
            log.info("reload: no live setting changed")
        self._reload_rules(new)
        gen = self.stats.header(sf.H_CONFIG_GEN) + 1
        write_applied_config(applied_config_path(self.stats.path), gen, applied)
        self.cfg = applied
        self.stats.set_header(sf.H_CONFIG_GEN, gen)  # after the file: a reader of gen finds it
        self.stats.set_header(sf.H_RELOADS, self.stats.header(sf.H_RELOADS) + 1)
        for pid in self.pids:
            with _suppress():
                os.kill(pid, signal.SIGHUP)
        self.reload_pending = (gen, time.monotonic() + RELOAD_WAIT_S)

    # -- rules (m3shm/rules/versions.py) --------------------------------------------------------
    def _rules_margin(self) -> int:
        c = self.cfg
        return versions.margin_ms(c.downsample.admission_ms, c.raw_namespace.buffer_past_ms,
                                  c.raw_namespace.buffer_future_ms)

    def _start_rules(self) -> None:
        """The saved rules or the config's, whichever is newer (versions.start_up), written
        to <data>/rules.json before any worker exists."""
        mtime = 0
        if self.config_path:
            with contextlib.suppress(OSError):
                mtime = os.stat(self.config_path).st_mtime_ns // 1_000_000
        self.rules_chain, why = versions.start_up(
            self.data, self.cfg.downsample.rule_set(), mtime,
            self.cfg.namespaces, int(time.time() * 1000),
            self._rules_margin())
        log.info("rules: %s", why)

    def _without_new_namespaces(self, new: Config) -> Config:
        """``new``, but with the running rules if its rules need a namespace the running
        daemon lacks (logged, naming the policy: that needs a restart); the rest of the
        reload still applies."""
        lacking = versions.missing_namespace(new.downsample.rule_set(), self.cfg.namespaces)
        if lacking is None:
            return new
        log.error("reload: %s; the rules stay at version %d", lacking,
                  self.stats.header(sf.H_RULES_VERSION))
        ds = dataclasses.replace(new.downsample, rules=self.cfg.downsample.rules)
        return dataclasses.replace(new, downsample=ds)

    def _reload_rules(self, new: Config) -> None:
        """SIGHUP: the config's rules become the next version if they changed since the
        daemon last read them (a PUT in between is not undone by an unchanged config)."""
        rs = new.downsample.rule_set()
        d = versions.digest(rs)
        try:
            with versions.locked(self.data):
                chain = versions.load(self.data)
                if chain is None:
                    raise ConfigError(f"{versions.RULES_FILE} is missing from {self.data}")
                if chain.config_digest == d:
                    log.info("reload: the config's rules are unchanged; rules stay at version "
                             "%d", chain.newest.version)
                    return
                if versions.missing_namespace(rs, self.cfg.namespaces) is not None:
                    return  # _reload said why and kept the running rules
                chain = versions.append(chain, rs, "config", int(time.time() * 1000),
                                        self._rules_margin(), d)
                versions.save(chain, self.data)
                versions.publish(self.stats, chain, changed=True)
        except (OSError, ConfigError) as e:
            log.error("reload: the rules were not changed: %s", e)
            return
        self.rules_chain = chain
        log.info("reload: rules version %d from the config, activation at %d ms",
                 chain.newest.version, chain.newest.activation_ms)

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


def serve(cfg: Config, config_path: str | None = None,
          overrides: dict[str, object] | None = None) -> int:
    """Run the daemon; ``config_path`` and ``overrides`` are re-applied at every SIGHUP."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    try:
        return Supervisor(cfg, config_path, overrides).run()
    except ConfigError as e:
        log.error("%s", e)
        return 2
