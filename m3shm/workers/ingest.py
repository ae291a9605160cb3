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
import time
from concurrent.futures import Executor
from dataclasses import dataclass

from m3shm.shm import Segment
from m3shm.storage.commitlog import Batch, CommitLog


class Overloaded(Exception):
    """Lanes full or the commit log behind: answer 503 with Retry-After."""


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


class IngestPipeline:
    def __init__(self, seg: Segment, producer: int, clog: CommitLog, pool: Executor,
                 reserve_wait_ms: int, max_pending: int) -> None:
        self.seg = seg
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

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, batch: bytearray, length: int, nrecords: int) -> Admitted:
        if self.closed:
            raise Overloaded("shutting down")
        if len(self.queue) >= self.max_pending:
            raise Overloaded("commit log is behind")
        fut = asyncio.get_running_loop().create_future()
        self.queue.append(_Item(batch, length, nrecords, int(time.time() * 1000), fut))
        self.wake.set()
        return await fut

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                group, self.queue = self.queue[:64], self.queue[64:]
                await self._commit(group)
            if self.closed and not self.queue:
                return

    async def _commit(self, group: list[_Item]) -> None:
        ok: list[tuple[_Item, Batch, Admitted]] = []
        for it in group:
            n, rej, rej_s, msg = self.seg.admit(it.batch, it.length)
            adm = Admitted(it.nrecords - rej, rej, rej_s, msg)
            if n == 0:
                it.fut.set_result(adm)
                continue
            payload = memoryview(it.batch)[:n]
            seq = self.seg.next_seq()
            deadline = time.monotonic() + self.reserve_wait
            while not self.seg.reserve(self.producer, payload, seq):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.002)
            else:
                ok.append((it, Batch(seq, it.arrival_ms, adm.records, payload), adm))
                continue
            it.fut.set_exception(Overloaded("ingest lanes are full"))
        if not ok:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.pool, self.clog.append, [b for _, b, _ in ok])
        except Exception as e:  # noqa: BLE001 - disk trouble: nothing of the group is acked
            self.seg.recover_producer(self.producer)
            for it, _, _ in ok:
                if not it.fut.done():
                    it.fut.set_exception(Overloaded(f"commit log write failed: {e}"))
            return
        self.seg.publish(self.producer)
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
