"""A worker's flusher: closed blocks -> filesets, commit-log trimming, retention.

Each worker flushes only its own shards, on a timer (``flush.interval``) and on request. A
*pass* (on the worker's thread pool, one at a time) covers every namespace (each with its own
segment, block size, write window, retention and commit-log directory; see
m3shm/workers/nsruntime.py). For each namespace it:

1. draws a sequence number with ``m3_seq_sync`` on that namespace's segment and notes the wall
   clock ``now``;
2. waits until its shards have applied everything published before (lane tails snapshot);
3. for each of its shards and each block the shard holds in memory: warm data of a closed
   block (start + blockSize + bufferPast <= now) becomes volume 0 of its fileset, cold data
   (of blocks already flushed) volume N+1 (m3shm/storage/shard_flush.py); the chunks are then
   released; expired blocks (start + blockSize <= now - retention) are released unwritten.

Then it
4. (every ``flush.snapshot_interval``, and at every admin flush) snapshots each namespace's
   open blocks of its shards (m3shm/storage/snapshot.py), so a restart replays only the
   commit log written after them;
5. (every ``flush.retention_interval``) deletes the filesets of its shards whose block ended
   before now - retention, in every namespace;
6. records each namespace's pass (and snapshot) in its state file (atomic rename, fsync'd):
   ``<data>/flush/state-w<index>.json`` for the raw namespace, ``state-<ns>-w<index>.json``
   for an aggregated one; the commit-log trimming of every worker reads these files
   (m3shm/storage/commitlog.py ``covered``), one namespace at a time;
7. deletes the commit-log files of each namespace that every worker's last pass (or kept
   snapshot) of that namespace covers (commitlog.deletable).

``POST /api/v1/admin/flush`` (:func:`flush_everywhere`) makes every worker rotate its commit
logs (SIGUSR1) and then run a pass (SIGUSR2), waiting for each phase in the state files of every
namespace, then trims:
when it answers 200 every closed block is durable in a fileset and the commit log it covered
is gone. Signals reach sibling workers through the supervisor's child list. A pass or rotation
that fails (a full disk: the state file cannot be written either) is counted in the worker's
stats-file slots (``m3shm_flush_failures_total``); the admin flush sees the count grow and
answers 507 (disk full) or 503 at once instead of waiting for its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from m3shm import stats
from m3shm._native import lib
from m3shm.atomicfile import replace_json
from m3shm.storage import commitlog, retention, snapshot
from m3shm.storage.commitlog import PassState
from m3shm.storage.fileset import complete_volumes, remove_incomplete, remove_superseded
from m3shm.storage.shard_flush import WARM, flush_block

if TYPE_CHECKING:
    from m3shm.workers.nsruntime import NsRuntime
    from m3shm.workers.worker import Worker

log = logging.getLogger("m3shm.flush")


def state_path(data_dir: str, index: int, ns: str | None = None) -> str:
    """Worker ``index``'s flush state of namespace ``ns`` (None: the raw one)."""
    name = f"state-w{index:03d}.json" if ns is None else f"state-{ns}-w{index:03d}.json"
    return os.path.join(data_dir, "flush", name)


def read_state(data_dir: str, index: int, ns: str | None = None) -> dict:
    try:
        with open(state_path(data_dir, index, ns)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def read_passes(data_dir: str, nworkers: int, ns: str | None = None
                ) -> list[PassState | None]:
    out: list[PassState | None] = []
    for i in range(nworkers):
        st = read_state(data_dir, i, ns)
        try:
            out.append(PassState(st["pass_seq"], st["pass_ms"], st["block_ms"],
                                 st["buffer_past_ms"], st.get("snapshot_keep_seq", 0)))
        except KeyError:
            out.append(None)
    return out


class Flusher:
    def __init__(self, w: Worker) -> None:
        self.w = w
        self.cfg = w.cfg
        self.seg = w.seg
        self.root = Path(w.data_dir) / "filesets"
        self.ns = w.cfg.raw_namespace
        self.states: dict[str | None, dict] = {
            rt.key: read_state(w.data_dir, w.index, rt.key) for rt in w.ns.values()}
        self._lock = threading.Lock()
        self._last_retention = 0.0
        self.blocks_written = 0
        # per namespace (state key): its snapshots of this worker's shards
        from m3shm.workers.worker import shard_range

        ranges = [range(*shard_range(i, w.nworkers, w.seg.params.num_shards))
                  for i in range(w.nworkers)]
        self.snapshots = {rt.key: snapshot.Snapshots(rt.seg, Path(w.data_dir) / "snapshots",
                                                     rt.name, self.root, range(w.lo, w.hi),
                                                     ranges)
                          for rt in w.ns.values()}
        self._last_snapshot = time.monotonic()
        os.makedirs(os.path.dirname(state_path(w.data_dir, w.index)), exist_ok=True)

    def start_up(self, replaying: bool) -> None:
        """Before replay and the first pass: drop incomplete filesets of our shards (a flush
        killed midway) and volumes a newer checkpointed one supersedes, and raise each
        shard's warm floor past its newest flushed block, so that replayed samples of flushed
        blocks go to cold chunks (merged into volume N+1)."""
        shards = range(self.w.lo, self.w.hi)
        remove_incomplete(self.root, shards)
        remove_superseded(self.root, shards)
        for snaps in self.snapshots.values():
            snaps.remove_incomplete()
        for rt in self.w.ns.values():  # every start: a killed owner may have left it stale
            table = self.w.flushed_store.pointers.get(rt.name)
            for s in shards if table is not None else ():
                table.rebuild(s, self.root / rt.name / f"{s:04d}")
        for rt in self.w.ns.values():
            for s in shards if replaying else ():
                starts = [bs for bs, _ in complete_volumes(self.root / rt.name / f"{s:04d}")]
                if starts:
                    rt.seg.set_warm_floor(s, max(starts) + rt.cfg.block_size_ms)

    # -- the pass (pool thread) -------------------------------------------------------------
    def run_pass(self, force_retention: bool = False, snapshot: bool = False) -> int:
        with self._lock:
            try:
                return self._pass(force_retention, snapshot)
            except Exception as e:
                if not getattr(e, "m3shm_counted", False):
                    self._count_failure(e)
                raise

    def _count_failure(self, e: BaseException) -> None:
        """Count a failed pass or rotation in the stats file (call with ``_lock`` held), where
        an admin flush waiting on the state files sees it (they may not be writable)."""
        self.w.stats.add(stats.W_FLUSH_FAILURES)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            self.w.stats.add(stats.W_FLUSH_DISK_FULL)

    def _pass(self, force_retention: bool, snapshot: bool = False) -> int:
        done = [(rt, *self._flush_ns(rt)) for rt in self.w.ns.values()]
        snaps, snap_error = self._snapshot(snapshot)
        written = sum(n for _, _, _, n in done)
        self.blocks_written += written
        mono = time.monotonic()
        if force_retention or mono - self._last_retention >= (
                self.cfg.flush.retention_interval_ms / 1000):
            self._last_retention = mono
            self.apply_retention(int(time.time() * 1000))  # before the states: an admin
            # flush waits for them
        for rt, seq, now, _ in done:
            self._save(rt.key, pass_seq=seq, pass_ms=now, block_ms=rt.cfg.block_size_ms,
                       buffer_past_ms=rt.cfg.buffer_past_ms, **snaps.get(rt.key, {}))
        self.trim()
        if snap_error is not None:
            raise snap_error
        return written

    def _snapshot(self, force: bool) -> tuple[dict[str | None, dict[str, int]],
                                              BaseException | None]:
        """Snapshot every namespace's open blocks if forced (admin flush) or due; returns
        the state keys to record per namespace, and the error (already counted) if one
        failed (e.g. disk full: the commit log keeps covering the data; the next pass tries
        again)."""
        every = self.cfg.flush.snapshot_interval_ms
        if every <= 0 or not (force or time.monotonic() - self._last_snapshot >= every / 1000):
            return {}, None
        out: dict[str | None, dict[str, int]] = {}
        try:
            for key, snaps in self.snapshots.items():
                seq, keep = snaps.take(self.w.drain_stopped)
                out[key] = {"snapshot_seq": seq, "snapshot_keep_seq": keep}
        except Exception as e:  # noqa: BLE001 - counted, recorded, raised after the states
            log.error("worker %d: snapshot failed: %s", self.w.index, e)
            self._count_failure(e)
            e.m3shm_counted = True  # type: ignore[attr-defined]
            return out, e
        self._last_snapshot = time.monotonic()
        return out, None

    def _flush_ns(self, rt: NsRuntime) -> tuple[int, int, int]:
        """Flush namespace ``rt``'s closed blocks of this worker's shards; returns the pass's
        (sequence number, now, blocks written)."""
        seg, ns = rt.seg, rt.cfg
        seq = int(lib.m3_seq_sync(seg.base))
        now = int(time.time() * 1000)
        tails = seg.tails()
        per_shard = seg.params.num_producers
        for s in range(seg.params.num_shards):  # wait only for our own shards' lanes
            if not self.w.lo <= s < self.w.hi:
                for p in range(per_shard):
                    tails[s * per_shard + p] = 0
        while not seg.caught_up(tails):
            if self.w.drain_stopped():
                raise RuntimeError("worker is stopping")
            time.sleep(0.001)
        written = 0
        for s in range(self.w.lo, self.w.hi):
            for b in seg.blocks(s):
                bs, kind = b["block_start"], b["kind"]
                if kind == WARM and bs + ns.block_size_ms + ns.buffer_past_ms > now:
                    continue  # still open for warm writes
                if bs + ns.block_size_ms <= now - ns.retention_ms:
                    seg.seal(s, bs, kind)  # expired before it was flushed: drop it
                    seg.release(s, bs, kind)
                    continue
                t0 = time.perf_counter()
                info = flush_block(seg, self.root, ns.name, ns.block_size_ms, s, bs, kind,
                                   self.w.flushed_store.pointers.get(ns.name))
                if info is not None:
                    written += 1
                    log.info("flushed %s shard %d block %d volume %d (%s): %d series, %d "
                             "samples, %d bytes in %.3fs", ns.name, s, bs, info.volume,
                             "warm" if kind == WARM else "cold", info.num_series,
                             info.num_samples, info.data_bytes, time.perf_counter() - t0)
            seg.reclaim(s)
        return seq, now, written

    def trim(self) -> list[str]:
        """Delete every namespace's commit-log files its passes cover."""
        removed = []
        for rt in self.w.ns.values():
            removed += commitlog.trim(rt.cl_dir,
                                      read_passes(self.w.data_dir, self.w.nworkers, rt.key))
        return removed

    def apply_retention(self, now: int) -> None:
        shards = range(self.w.lo, self.w.hi)
        for ns in self.cfg.namespaces:
            gone = retention.expire(self.root, ns.name, ns.block_size_ms, shards,
                                   now - ns.retention_ms)
            table = self.w.flushed_store.pointers.get(ns.name)
            for fid in gone:
                if table is not None:
                    table.set(fid.shard, fid.block_start, -1)
                self.w.flushed_store.forget(fid)

    def note_rotated(self, rt: NsRuntime) -> None:
        self._save(rt.key, rotated_seq=int(lib.m3_seq_sync(rt.seg.base)))

    def _save(self, key: str | None, **kv: int) -> None:
        state = self.states.setdefault(key, {})
        state.update(kv)
        replace_json(state_path(self.w.data_dir, self.w.index, key), state)

    # -- scheduling (event loop) ------------------------------------------------------------
    async def timer(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.flush.interval_ms / 1000)
            try:
                await self.rotate()
            except Exception as e:  # noqa: BLE001 - disk trouble: the pass still runs
                log.error("worker %d: commit log rotation failed: %s", self.w.index, e)
            try:
                await self.flush_now()
            except OSError as e:  # disk full: the blocks stay in memory; next interval
                log.error("worker %d: flush pass failed, retrying in %.1fs: %s",
                          self.w.index, self.cfg.flush.interval_ms / 1000, e)
            except Exception:  # noqa: BLE001 - log, retry next interval
                log.exception("worker %d: flush pass failed", self.w.index)

    async def rotate(self) -> None:
        try:
            for rt in self.w.ns.values():
                assert rt.pipeline is not None
                await rt.pipeline.rotate_log()
                self.note_rotated(rt)
        except Exception as e:
            with self._lock:
                self._count_failure(e)
            raise

    async def flush_now(self, force_retention: bool = False, snapshot: bool = False) -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.w.pool, self.run_pass, force_retention,
                                          snapshot)

    async def admin_pass(self) -> int:
        """The pass an admin flush asks for: also snapshots the open blocks."""
        return await self.flush_now(snapshot=True)


def sibling_workers() -> list[int]:
    """Pids of every worker of this daemon (the supervisor's children)."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/task/{ppid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return [os.getpid()]


def _failures(w: Worker, slot: int) -> list[int]:
    return [w.statsfile.worker(i).get(slot) for i in range(w.nworkers)]


def _behind(w: Worker, key: str, marks: dict[str | None, int]) -> list[int]:
    """Workers whose state of some namespace does not record ``key`` past its mark."""
    return [i for i in range(w.nworkers)
            if any(read_state(w.data_dir, i, ns).get(key, 0) <= m for ns, m in marks.items())]


async def _wait_states(w: Worker, key: str, marks: dict[str | None, int], deadline: float,
                       failed: list[int]) -> bool:
    """Wait until every worker's state of every namespace records ``key`` past that
    namespace's mark; False at the deadline or as soon as a worker's failure count passes
    ``failed``."""
    while time.monotonic() < deadline:
        if not _behind(w, key, marks):
            return True
        if _failures(w, stats.W_FLUSH_FAILURES) != failed:
            return False
        await asyncio.sleep(0.01)
    return False


async def flush_everywhere(w: Worker, timeout: float = 120) -> tuple[int, str]:
    """Rotate every worker's commit log, then flush every worker's closed blocks; trim.
    Returns the HTTP status (200; 507 if a worker failed for lack of space, 503 for another
    failure or the timeout) and a message."""
    deadline = time.monotonic() + timeout
    failed = _failures(w, stats.W_FLUSH_FAILURES)
    full = _failures(w, stats.W_FLUSH_DISK_FULL)
    for key, sig in (("rotated_seq", signal.SIGUSR1), ("pass_seq", signal.SIGUSR2)):
        marks = {rt.key: int(lib.m3_seq_sync(rt.seg.base)) for rt in w.ns.values()}
        for pid in sibling_workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        phase = key.split("_")[0]
        if not await _wait_states(w, key, marks, deadline, failed):
            now_failed = _failures(w, stats.W_FLUSH_FAILURES)
            bad = [i for i in range(w.nworkers) if now_failed[i] != failed[i]]
            if bad and _failures(w, stats.W_FLUSH_DISK_FULL) != full:
                return 507, (f"disk full: the {phase} phase failed on workers {bad} for lack "
                             "of space; the blocks stay in memory and the commit log keeps "
                             "them; retry once space is freed")
            if bad:
                return 503, f"the {phase} phase failed on workers {bad} (see the log); retry"
            late = _behind(w, key, marks)
            return 503, f"workers {late} did not finish the {phase} phase in {timeout:.0f}s"
    removed = await asyncio.get_running_loop().run_in_executor(w.pool, w.flusher.trim)
    return 200, f"flushed; {len(removed)} commit-log files deleted"
