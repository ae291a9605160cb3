"""Running queries of every worker, visible from any worker (GET /api/v1/status/queries).

Each worker keeps its running queries in memory and mirrors them to one small JSON file,
``<data_dir>/queries/worker-<index>.json``, written to a temporary name and renamed (a reader
sees the old list or the new one, never half of one). The file is rewritten at most every
``FLUSH_S`` seconds while anything changed or a query runs (so the series and samples counts
move), and emptied when a worker starts (a killed incarnation's queries are gone with it).
Any worker answers the endpoint by reading every worker's file and its own live list.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import json
import os
import time
from datetime import UTC, datetime

from m3shm.query.context import QueryContext

FLUSH_S = 0.2


class QueryRegistry:
    def __init__(self, data_dir: str, worker: int) -> None:
        self.dir = os.path.join(data_dir, "queries")
        os.makedirs(self.dir, exist_ok=True)
        self.worker = worker
        self.path = os.path.join(self.dir, f"worker-{worker}.json")
        self.running: dict[int, QueryContext] = {}
        self._ids = itertools.count(1)
        self._scheduled = False
        self._write()

    def add(self, ctx: QueryContext) -> int:
        qid = next(self._ids)
        self.running[qid] = ctx
        self._schedule()
        return qid

    def remove(self, qid: int) -> None:
        self.running.pop(qid, None)
        self._schedule()

    def entries(self) -> list[dict]:
        now = time.time()
        return [{"worker": self.worker, "id": qid, "expr": c.expr,
                 "started": datetime.fromtimestamp(c.started, UTC).isoformat()
                 .replace("+00:00", "Z"),
                 "elapsed_seconds": round(now - c.started, 3), "series": c.series,
                 "samples": c.samples, "bytes_estimate": c.bytes}
                for qid, c in self.running.items()]

    def all_entries(self) -> list[dict]:
        """Every worker's running queries (this worker's live, the others' from files)."""
        out = self.entries()
        for path in sorted(glob.glob(os.path.join(self.dir, "worker-*.json"))):
            if path == self.path:
                continue
            with contextlib.suppress(OSError, ValueError), open(path) as f:
                out.extend(json.load(f))
        out.sort(key=lambda e: e["started"])
        return out

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_S, self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        self._write()
        if self.running:
            self._schedule()

    def _write(self) -> None:
        tmp = f"{self.path}.tmp"
        with contextlib.suppress(OSError):
            with open(tmp, "w") as f:
                json.dump(self.entries(), f)
            os.replace(tmp, self.path)
