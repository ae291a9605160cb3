"""The stats file: heartbeats and per-worker counters in a small shared mmap.

Format: docs/formats/stats.md.

The supervisor creates ``/dev/shm/m3shm-<hash>.stats`` beside the segment before it forks; the
workers inherit the mapping. It is deliberately not part of the segment: it holds no data, only
what the supervisor (watchdog, reload) and ``GET /metrics`` need, and its layout can change
without touching the segment's.

Layout: a header block, then one block per worker, every field a little-endian u64 slot. Each
slot has exactly one writer at a time (the header: the supervisor; a worker block: that worker's
event loop, except the commit-log slots, written by whichever thread holds the commit log's
lock, and the flush-failure slots, written by the thread holding the flusher's lock). Aligned
8-byte stores and loads are single instructions on the platforms m3shm runs on, so a reader
never sees a torn value; it may see a slightly stale one, which is all a counter or a heartbeat
needs. No fences: nothing else is ordered by these values. One exception: ``W_QUERIES_RUNNING``
is changed only with seq_cst atomics (csrc/query_slots.c), because workers admit queries
daemon-wide by summing every worker's count.

A worker restarted by the supervisor keeps its block, so its counters continue where the dead
incarnation left them (Prometheus counters stay monotonic across worker restarts). Counters are
per request or per batch, never per sample, so Python writes are cheap enough.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time

from m3shm.shmfile import create_mapped

MAGIC = int.from_bytes(b"M3STATS1", "little")
VERSION = 1
HEADER_SLOTS = 64            # changing this changes the format
WORKER_SLOTS = 128           # changing this changes the format

# -- header slots ----------------------------------------------------------------------------
H_MAGIC, H_VERSION, H_NWORKERS, H_WORKER_SLOTS = 0, 1, 2, 3
H_SUPERVISOR_PID = 4
H_START_UNIX_MS = 5          # supervisor start, wall clock
H_CONFIG_GEN = 6             # generation of the config in force (1 at start, +1 per reload)
H_RELOADS = 7                # accepted reloads
H_RELOAD_FAILURES = 8        # rejected reloads (bad file; old config kept)
H_READY = 9                  # 1 once READY=1 was sent (every worker recovered)
# rules (m3shm/rules/versions.py): writer = whoever holds <data>/rules.lock (the supervisor at
# start and on SIGHUP, a worker answering PUT /api/v1/rules), after rules.json is renamed
H_RULES_VERSION = 10         # newest rule-set version in <data>/rules.json
H_RULES_ACTIVATION_MS = 11   # its activation time, unix ms
H_RULES_CHANGES = 12         # versions written since start (PUT, SIGHUP)

# -- worker slots ----------------------------------------------------------------------------
W_PID = 0
W_INCARNATION = 1
W_HEARTBEAT_MS = 2           # CLOCK_MONOTONIC ms of the last beat (0: never)
W_STATE = 3                  # one of STATES
W_CONFIG_GEN = 4             # config generation this worker applies
W_RESTARTS = 5               # written by the supervisor
W_REQUESTS = 6               # remote-write requests received
W_SAMPLES_RECEIVED = 7       # samples in decodable request bodies
W_SAMPLES_WRITTEN = 8        # samples acknowledged (durable)
W_CL_BYTES = 9               # commit log bytes written
W_CL_BATCHES = 10            # commit log records (batches) written
W_FSYNC_COUNT = 11
W_FSYNC_SUM_NS = 12
W_FSYNC_BUCKETS = 13         # len(FSYNC_BUCKETS_S) + 1 cumulative buckets (last is +Inf)
FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5)
W_QUERIES_RUNNING = 28       # queries this worker evaluates now; atomic, csrc/query_slots.c
W_FLUSH_FAILURES = 29        # flush passes and commit-log rotations that failed
W_FLUSH_DISK_FULL = 30       # ... of them for lack of space (ENOSPC, EDQUOT)
W_RULES_VERSION = 31         # newest rule-set version this worker installed
W_RULES_ACTIVATION_MS = 63   # its activation time, unix ms (the request reasons grow below)
W_REQ_REJECTED = 32          # len(REQUEST_REASONS) slots
W_SAMPLES_REJECTED = 64      # len(SAMPLE_REASONS) slots
# rollup barrier (csrc/fwdmark.c): unix ms T, every rollup input window of the worker's shards
# final at T is forwarded; written with release stores by csrc/fwdmark.c only
W_FWD_MARK_MS = 127

STATES = ("starting", "recovering", "serving", "stopping")
ST_STARTING, ST_RECOVERING, ST_SERVING, ST_STOPPING = range(4)

# persisted order: append only (a slot's meaning never changes)
REQUEST_REASONS = ("method", "unsupported_media_type", "too_large", "malformed",
                   "invalid_series", "segment_full", "overloaded", "shutting_down", "disk_full")
SAMPLE_REASONS = ("bad_label_name", "duplicate_label", "no_labels", "no_metric_name",
                  "too_many_labels", "label_too_long", "too_old", "too_new", "histogram",
                  "malformed", "bad_utf8", "segment_full", "overloaded", "shutting_down",
                  "exemplars", "bad_symbol_ref", "too_many_series", "bad_metadata", "disk_full")
assert W_FSYNC_BUCKETS + len(FSYNC_BUCKETS_S) + 1 <= W_REQ_REJECTED
assert W_REQ_REJECTED + len(REQUEST_REASONS) <= W_RULES_ACTIVATION_MS < W_SAMPLES_REJECTED
assert W_SAMPLES_REJECTED + len(SAMPLE_REASONS) <= W_FWD_MARK_MS < WORKER_SLOTS


def monotonic_ms() -> int:
    """CLOCK_MONOTONIC in ms: one clock for every process on the machine."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000


def stats_size(nworkers: int) -> int:
    return (HEADER_SLOTS + nworkers * WORKER_SLOTS) * 8


class StatsFile:
    """A mapped stats file; ``slots`` is a u64 memoryview over all of it."""

    def __init__(self, path: str, mm: mmap.mmap) -> None:
        self.path = path
        self._mm = mm
        self.slots = memoryview(mm).cast("Q")
        self.nworkers = int(self.slots[H_NWORKERS])

    @classmethod
    def create(cls, path: str, nworkers: int) -> StatsFile:
        mm = create_mapped(path, stats_size(nworkers))
        s = memoryview(mm).cast("Q")
        s[H_VERSION], s[H_NWORKERS], s[H_WORKER_SLOTS] = VERSION, nworkers, WORKER_SLOTS
        s[H_SUPERVISOR_PID] = os.getpid()
        s[H_START_UNIX_MS] = int(time.time() * 1000)
        s[H_CONFIG_GEN] = 1
        s[H_MAGIC] = MAGIC  # last: a reader that sees the magic sees a filled header
        s.release()
        return cls(path, mm)

    @classmethod
    def open(cls, path: str) -> StatsFile:
        """Map an existing file read-write (tools and tests); checks magic and version."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SLOTS * 8:
                raise ValueError(f"{path}: {size} bytes, too small for a stats file")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        s = memoryview(mm).cast("Q")
        magic, version, n, ws = s[H_MAGIC], s[H_VERSION], s[H_NWORKERS], s[H_WORKER_SLOTS]
        s.release()
        if magic != MAGIC or version != VERSION or ws != WORKER_SLOTS:
            raise ValueError(f"{path}: not a version-{VERSION} m3shm stats file")
        if size < stats_size(n):
            raise ValueError(f"{path}: {size} bytes, {n} workers need {stats_size(n)}")
        return cls(path, mm)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def header(self, slot: int) -> int:
        return int(self.slots[slot])

    def set_header(self, slot: int, value: int) -> None:
        self.slots[slot] = value

    def worker(self, index: int) -> WorkerStats:
        if not 0 <= index < self.nworkers:
            raise IndexError(f"worker {index} of {self.nworkers}")
        return WorkerStats(self.slots, HEADER_SLOTS + index * WORKER_SLOTS)

    def sum(self, slot: int) -> int:
        """A worker slot summed over every worker."""
        s = self.slots
        return sum(int(s[HEADER_SLOTS + i * WORKER_SLOTS + slot]) for i in range(self.nworkers))


class WorkerStats:
    """One worker's block. Writers: see the module docstring (one writer per slot)."""

    __slots__ = ("s", "base")

    def __init__(self, slots: memoryview, base: int) -> None:
        self.s = slots
        self.base = base

    def get(self, slot: int) -> int:
        return int(self.s[self.base + slot])

    def set(self, slot: int, value: int) -> None:
        self.s[self.base + slot] = value

    def add(self, slot: int, n: int = 1) -> None:
        self.s[self.base + slot] += n

    def beat(self) -> None:
        self.s[self.base + W_HEARTBEAT_MS] = monotonic_ms()

    def reject_request(self, reason: str, samples: int = 0,
                       sample_reason: str | None = None) -> None:
        """Count a rejected request and, if any, its rejected samples."""
        self.s[self.base + W_REQ_REJECTED + REQUEST_REASONS.index(reason)] += 1
        if samples:
            self.reject_samples(sample_reason or reason, samples)

    def reject_samples(self, reason: str, n: int) -> None:
        """``reason``: one of SAMPLE_REASONS (every decoder reason is one; a test checks)."""
        self.s[self.base + W_SAMPLES_REJECTED + SAMPLE_REASONS.index(reason)] += n

    def observe_fsync(self, seconds: float) -> None:
        """Record one fsync's latency (caller holds the commit log's lock)."""
        s, b = self.s, self.base
        s[b + W_FSYNC_COUNT] += 1
        s[b + W_FSYNC_SUM_NS] += int(seconds * 1e9)
        for i, le in enumerate(FSYNC_BUCKETS_S):
            if seconds <= le:
                s[b + W_FSYNC_BUCKETS + i] += 1
        s[b + W_FSYNC_BUCKETS + len(FSYNC_BUCKETS_S)] += 1

    def wrote_commitlog(self, nbytes: int, nbatches: int) -> None:
        self.s[self.base + W_CL_BYTES] += nbytes
        self.s[self.base + W_CL_BATCHES] += nbatches


def stats_path(segment_path: str) -> str:
    """The stats file beside a segment: ``…/m3shm-<hash>.seg`` -> ``…/m3shm-<hash>.stats``."""
    root, _ = os.path.splitext(segment_path)
    return root + ".stats"
