"""The worker's ingest pipeline: admit -> reserve lane space -> commit log -> publish -> 2xx.

Requests decode in parallel on the thread pool; their batches then queue here. One task drains
the queue in groups: for each batch it takes a global sequence number and reserves room in this
worker's lanes (a full lane is retried for ``reserve_wait`` and then answered 503, so memory
stays bounded), appends the whole group to the commit log with one write and one fsync (group
commit, on the pool), publishes the lanes (one release store per lane) and only then resolves
the requests' futures, which answer 2xx. This is the only code that touches this worker's lanes
as a producer, so the single-producer rule of csrc/lane.c holds by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import struct
import time
from concurrent.futures import Executor
from dataclasses import dataclass

from m3shm.shm import Segment
from m3shm.storage.commitlog import Batch, CommitLog


class Overloaded(Exception):
    """Lanes full or the commit log behind: answer 503 with Retry-After."""


class DiskFull(Overloaded):
    """The commit log could not be written or synced for lack of space (ENOSPC, EDQUOT):
    nothing of the batch is acknowledged; answer 507 with Retry-After. Ingestion resumes by
    itself with the first append that finds room."""


def _disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass
class Admitted:
    records: int
    rejected_records: int
    rejected_samples: int
    message: str


@dataclass
class _Item:
    batch: bytearray
    length: int
    nrecords: int
    arrival_ms: int
    fut: asyncio.Future
    adm: Admitted | None = None  # set once admitted (admit shortens the batch in place)


def split_batch(batch: bytearray, length: int, limit: int) -> list[tuple[bytearray, int]]:
    """Cut a batch into parts of at most ``limit`` bytes at record boundaries (one header read
    per record; only oversized batches take this path)."""
    parts: list[tuple[bytearray, int]] = []
    view = memoryview(batch)
    start = off = n = 0
    while off < length:
        (rlen,) = struct.unpack_from("<I", batch, off)
        if off + rlen - start > limit and off > start:
            parts.append((bytearray(view[start:off]), n))
            start, n = off, 0
        off += rlen
        n += 1
    if off > start:
        parts.append((bytearray(view[start:off]), n))
    return parts


class IngestPipeline:
    def __init__(self, seg: Segment, producer: int, clog: CommitLog, pool: Executor,
                 reserve_wait_ms: int, max_pending: int, bells: Segment | None = None) -> None:
        self.seg = seg
        self.bells = bells  # the segment whose doorbells the owners sleep on (csrc/bell.c)
        self.producer = producer
        self.clog = clog
        self.pool = pool
        self.reserve_wait = reserve_wait_ms / 1000
        self.max_pending = max_pending
        self.queue: list[_Item] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.closed = False
        self.batches = 0
        self._rotations: list[asyncio.Future] = []

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, batch: bytearray, length: int, nrecords: int) -> Admitted:
        """Commit a batch; answers once it is durable and published. A batch larger than
        half a lane is split at record boundaries into parts committed one after the other
        (the request is acknowledged only when every part is; a retry after a 503 rewrites
        the parts that made it, which is harmless)."""
        limit = self.seg.params.lane_bytes // 2
        if length <= limit:
            return await self._submit_one(batch, length, nrecords)
        total = Admitted(0, 0, 0, "")
        for part, n in split_batch(batch, length, limit):
            adm = await self._submit_one(part, len(part), n)
            total.records += adm.records
            total.rejected_records += adm.rejected_records
            total.rejected_samples += adm.rejected_samples
            total.message = total.message or adm.message
        return total

    async def _submit_one(self, batch: bytearray, length: int, nrecords: int) -> Admitted:
        if self.closed:
            raise Overloaded("shutting down")
        if len(self.queue) >= self.max_pending:
            raise Overloaded("commit log is behind")
        fut = asyncio.get_running_loop().create_future()
        self.queue.append(_Item(batch, length, nrecords, int(time.time() * 1000), fut))
        self.wake.set()
        return await fut

    async def rotate_log(self) -> bool:
        """Rotate the commit log between two groups (after the previous group's publish, so
        the closed file's index is taken after every batch in it is visible)."""
        if self.closed:
            return False
        fut = asyncio.get_running_loop().create_future()
        self._rotations.append(fut)
        self.wake.set()
        return await fut

    async def _rotate(self) -> None:
        futs, self._rotations = self._rotations, []
        try:
            done = await asyncio.get_running_loop().run_in_executor(self.pool, self.clog.rotate)
        except Exception as e:  # noqa: BLE001 - disk trouble: the caller decides
            for f in futs:
                if not f.done():
                    f.set_exception(e)
            return
        for f in futs:
            if not f.done():
                f.set_result(done)

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue or self._rotations:
                if self._rotations:
                    await self._rotate()
                    continue
                group, self.queue = self.queue[:64], self.queue[64:]
                await self._commit(group)
            if self.closed and not self.queue:
                for f in self._rotations:
                    if not f.done():
                        f.set_result(False)
                return

    async def _commit(self, group: list[_Item]) -> None:
        ok: list[tuple[_Item, Batch, Admitted]] = []
        for i, it in enumerate(group):
            if it.adm is None:
                n, rej, rej_s, msg = self.seg.admit(it.batch, it.length)
                it.adm, it.length = Admitted(it.nrecords - rej, rej, rej_s, msg), n
            adm = it.adm
            if it.length == 0:
                it.fut.set_result(adm)
                continue
            payload = memoryview(it.batch)[:it.length]
            seq = self.seg.reserve_next(self.producer, payload)
            if seq is None and ok:
                # Never wait for room while holding reserved seqs: owners wait for those
                # (lane.c), so commit what is reserved and retry the rest in the next group.
                self.queue[:0] = group[i:]
                break
            deadline = time.monotonic() + self.reserve_wait
            while seq is None and time.monotonic() <= deadline:
                await asyncio.sleep(0.002)
                seq = self.seg.reserve_next(self.producer, payload)
            if seq is None:
                it.fut.set_exception(Overloaded("ingest lanes are full"))
                continue
            ok.append((it, Batch(seq, it.arrival_ms, adm.records, payload), adm))
        if not ok:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.pool, self.clog.append, [b for _, b, _ in ok])
        except Exception as e:  # noqa: BLE001 - disk trouble: nothing of the group is acked
            self.seg.recover_producer(self.producer)
            err = (DiskFull(f"disk full: the commit log cannot be written ({e}); nothing of "
                            "this request was stored") if _disk_full(e)
                   else Overloaded(f"commit log write failed: {e}"))
            for it, _, _ in ok:
                if not it.fut.done():
                    it.fut.set_exception(err)
            return
        self.seg.publish(self.producer, self.bells)
        self.batches += len(ok)
        for it, _, adm in ok:
            if not it.fut.done():
                it.fut.set_result(adm)

    async def close(self) -> None:
        """Finish every queued batch, then stop."""
        self.closed = True
        self.wake.set()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
