"""The Prometheus HTTP query API of a worker (Grafana's Prometheus data source talks to this).

Paths, parameters and JSON shapes are Prometheus 2.42's: ``/api/v1/query``, ``query_range``,
``series``, ``labels``, ``label/<name>/values``, ``metadata``, ``status/buildinfo``,
``format_query``, plus ``status/queries`` (running queries of every worker) and remote read
(:mod:`m3shm.net.remoteread`). ``m3shm.net.api`` routes here, also under ``/prometheus``.

Each query gets a :class:`~m3shm.query.context.QueryContext` (limits from config ``query:``,
its deadline, a stop flag) and runs on this worker's query thread pool, never on the event
loop: selection, decoding, evaluation and JSON formatting all happen there. At most
``query.max_concurrency`` queries run at once in the whole daemon (every worker's running
count is a slot of the stats file, claimed atomically by csrc/query_slots.c); others wait in
line within their timeout, as in Prometheus' query queue, then get 503 ``timeout``.
The event loop waits for either the result or the client's disconnect; a disconnect sets the
stop flag, which the storage and the engine check between shards, series batches and AST
nodes, so the thread stops at once. Before a query reads, it waits (up to
``query.catchup_wait``) until every shard has applied what was acknowledged before it began;
when that does not happen (an owner restarting) or a shard is still recovering, the answer
carries what is there and a warning that it may be partial.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

import m3shm
from m3shm import heap
from m3shm import stats as st
from m3shm._native import ffi, lib
from m3shm.net.http import Request, Response
from m3shm.net.promjson import (
    ApiError,
    error,
    parse_duration,
    parse_time,
    result_json,
    success,
    success_body,
)
from m3shm.net.queryreg import QueryRegistry
from m3shm.query.context import QueryContext, QueryLimits
from m3shm.query.engine import Engine, Limits, Result
from m3shm.query.errors import QueryCanceledError, QueryError, QueryLimitError, QueryTimeoutError
from m3shm.query.local import ShmSource
from m3shm.query.matchers import Matcher, from_selector
from m3shm.query.resolution import NamespaceView, ResolutionStorage
from m3shm.storage.shm_index import ShmIndex

if TYPE_CHECKING:
    from m3shm.workers.worker import Worker

log = logging.getLogger("m3shm.promapi")

MAX_POINTS_PER_SERIES = 11_000  # Prometheus' resolution limit for query_range
INDEX_REFRESH_S = 1.0
ADMIT_POLL_S, ADMIT_POLL_MAX_S = 0.002, 0.05  # a queued query re-checks for a free slot
WORKER_HEADER = "X-M3shm-Worker"  # on every query API answer: the index of the answering worker
# on query and listing answers: the namespaces that answered, finest first, with their
# resolution ("default=raw,agg_1m_30d=1m"); empty when none held matching data
NAMESPACES_HEADER = "X-M3shm-Namespaces"
TRIM_AFTER = 10_000  # series indexed by one refresh that make it return freed heap to the OS
MIN_TIME, MAX_TIME = -(1 << 62), 1 << 62
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class PromApi:
    def __init__(self, w: Worker) -> None:
        self.w = w
        self.qcfg = w.cfg.query
        self.index = ShmIndex(w.seg)
        self.indexes = [self.index]  # one per namespace with a segment (refreshed together)
        self.segments = [w.seg]
        self.namespaces = self._namespaces()
        self.sources = self.namespaces[0].sources  # the raw namespace's
        self.pool = ThreadPoolExecutor(self.qcfg.max_concurrency + 1,
                                       thread_name_prefix="m3shm-query")
        # daemon-wide admission: this worker's W_QUERIES_RUNNING slot of the stats file, and
        # every other worker's (a dead incarnation's claims are dropped here, before serving)
        sf = w.statsfile
        self._qslots = ffi.from_buffer("uint64_t[]", sf.slots)
        self._qcounters = self._qslots + st.HEADER_SLOTS + st.W_QUERIES_RUNNING
        self._nworkers = sf.nworkers
        lib.m3_qslot_reset(self._qcounters, st.WORKER_SLOTS, w.index)
        self.registry = QueryRegistry(w.data_dir, w.index)
        self.limits = QueryLimits(self.qcfg.max_series, self.qcfg.max_samples,
                                  self.qcfg.max_bytes)
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
        self.routes: dict[str, Callable[[Request], Any]] = {
            "/api/v1/query": self.query, "/api/v1/query_range": self.query_range,
            "/api/v1/series": self.series, "/api/v1/labels": self.labels,
            "/api/v1/metadata": self.metadata, "/api/v1/status/buildinfo": self.buildinfo,
            "/api/v1/format_query": self.format_query,
            "/api/v1/status/queries": self.running_queries,
        }
        from m3shm.net.remoteread import READ_PATHS, remote_read

        for path in READ_PATHS:
            self.routes[path] = lambda req: remote_read(self, req)

    def _namespaces(self) -> list[NamespaceView]:
        """Every configured namespace as the query sees it: its filesets and, once its segment
        exists (``Worker.ns[name].seg``), its shared memory. The raw namespace first."""
        from m3shm.query.fileset_source import FilesetSource

        w = self.w
        runtimes = getattr(w, "ns", None) or {}
        nshards = w.seg.params.num_shards
        out = []
        for ns in sorted(w.cfg.namespaces, key=lambda n: n.aggregated):
            # oldest data first: flushed blocks, then shared memory (which wins a tie)
            sources: list[Any] = [FilesetSource(w.flushed_store, ns.name, nshards)]
            if not ns.aggregated:
                sources.append(ShmSource(self.index))
            else:
                rt = runtimes.get(ns.name)
                seg = getattr(rt, "seg", None)
                if seg is not None:
                    idx = ShmIndex(seg)
                    self.indexes.append(idx)
                    self.segments.append(seg)
                    sources.append(ShmSource(idx))
            out.append(NamespaceView(ns.name, ns.resolution_ms, ns.retention_ms, sources))
        return out

    def storage(self, ctx: QueryContext) -> ResolutionStorage:
        """The storage of one query: every namespace, each series at the finest resolution
        that holds it (m3shm/query/resolution.py)."""
        return ResolutionStorage(self.namespaces, ctx)

    def _refresh_all(self) -> int:
        return sum(idx.refresh() for idx in self.indexes)

    def route(self, path: str) -> Callable[[Request], Any] | None:
        h = self.routes.get(path)
        if h is None and path.startswith("/api/v1/label/") and path.endswith("/values"):
            h = self.label_values
        if h is None:
            return None

        async def tagged(req: Request, h: Callable[[Request], Any] = h) -> Response:
            resp = await h(req)
            resp.headers[WORKER_HEADER] = str(self.w.index)
            return resp

        return tagged

    async def _refresh_loop(self) -> None:
        """Index new series in the background, so a query rarely indexes many itself."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(INDEX_REFRESH_S)
            try:
                if await loop.run_in_executor(self.pool, self._refresh_all) >= TRIM_AFTER:
                    # indexing leaves its read buffers in glibc's arenas (m3shm/heap.py)
                    await loop.run_in_executor(self.pool, heap.trim)
            except Exception:  # noqa: BLE001 - keep refreshing; the query path reports errors
                log.exception("index refresh failed")

    # -- plumbing ------------------------------------------------------------------------------
    @staticmethod
    def form(req: Request) -> dict[str, list[str]]:
        params = {k: list(v) for k, v in req.query.items()}
        ctype = req.headers.get("content-type", "")
        if req.method == "POST" and ctype.startswith("application/x-www-form-urlencoded"):
            from urllib.parse import parse_qs

            for k, v in parse_qs(req.body.decode("utf-8", "replace"),
                                 keep_blank_values=True).items():
                params.setdefault(k, []).extend(v)
        return params

    @staticmethod
    def one(form: dict[str, list[str]], name: str) -> str | None:
        v = form.get(name)
        return v[0] if v else None

    def _ctx(self, form: dict[str, list[str]], expr: str) -> QueryContext:
        timeout_ms = self.qcfg.timeout_ms
        t = self.one(form, "timeout")
        if t:
            timeout_ms = min(timeout_ms, parse_duration(t, "timeout"))
        return QueryContext(expr, self.limits, time.monotonic() + timeout_ms / 1000,
                            timeout_ms / 1000)

    async def _catch_up(self, ctx: QueryContext) -> None:
        """Wait until every shard applied what was acknowledged before now, or warn."""
        segs = self.segments
        tails = [seg.tails() for seg in segs]
        deadline = time.monotonic() + self.qcfg.catchup_wait_ms / 1000
        while not all(seg.caught_up(t) for seg, t in zip(segs, tails, strict=True)):
            if time.monotonic() > deadline:
                ctx.warnings.append("some shards have not applied every acknowledged write "
                                    f"within {self.qcfg.catchup_wait_ms} ms (a worker may be "
                                    "restarting): the result may be partial")
                break
            await asyncio.sleep(0.0005)
        if not all(seg.all_recovered() for seg in segs):
            ctx.warnings.append("some shards are still recovering their data after a "
                                "restart: the result may be partial")

    async def run(self, req: Request, ctx: QueryContext,
                  fn: Callable[[QueryContext], Response]) -> Response:
        """Run ``fn(ctx)`` on the query pool within the limits; map errors to responses."""
        loop = asyncio.get_running_loop()
        remaining = (ctx.deadline or 0) - time.monotonic()
        if not await self._admit(remaining):
            return error("timeout", "query timed out in the query queue: "
                                    f"query.max_concurrency={self.qcfg.max_concurrency} "
                                    "queries were running in the daemon")
        qid = self.registry.add(ctx)
        held = False  # a streamed answer keeps its slot until the stream ends
        try:
            await self._catch_up(ctx)
            fut = loop.run_in_executor(self.pool, fn, ctx)
            waiters: set[asyncio.Future] = {fut}
            closed = None
            if req.closed is not None:
                closed = loop.create_task(req.closed.wait())
                waiters.add(closed)
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if closed is not None and not closed.done():
                closed.cancel()
            if fut not in done:  # the client went away: stop the query where it is
                ctx.cancel()
                with contextlib.suppress(Exception):
                    await fut
                return error("canceled", "query canceled: the client closed the connection")
            try:
                resp = fut.result()
                if resp.stream is not None:
                    resp.stream = self._holding(resp.stream, qid)
                    held = True
                return resp
            except ApiError as e:
                return error(e.kind, str(e))
            except QueryCanceledError as e:
                return error("canceled", str(e))
            except QueryTimeoutError as e:
                return error("timeout", str(e))
            except QueryLimitError as e:
                return error("execution", str(e))
            except QueryError as e:
                return error("execution", str(e))
        finally:
            if not held:
                self._release(qid)

    def _release(self, qid: int) -> None:
        self.registry.remove(qid)
        lib.m3_qslot_leave(self._qcounters, st.WORKER_SLOTS, self.w.index)
        # a large query leaves its peak in glibc's arenas: hand it back (m3shm/heap.py)
        asyncio.get_running_loop().run_in_executor(self.pool, heap.trim)

    async def _holding(self, stream: AsyncIterator[bytes], qid: int) -> AsyncIterator[bytes]:
        """``stream``, then the query's slot and registry entry released (also when the
        client goes away mid-stream and the stream is closed)."""
        try:
            async for chunk in stream:
                yield chunk
        finally:
            self._release(qid)

    async def _admit(self, wait_s: float) -> bool:
        """Claim one of the daemon's ``query.max_concurrency`` slots, waiting in line for at
        most ``wait_s`` seconds (polling: the other workers' queries end in other processes)."""
        deadline = time.monotonic() + wait_s
        pause = ADMIT_POLL_S
        while not lib.m3_qslot_enter(self._qcounters, self._nworkers, st.WORKER_SLOTS,
                                     self.w.index, self.qcfg.max_concurrency):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # jitter: two workers that took their claims back at once do not retry in step
            await asyncio.sleep(min(left, pause * (0.5 + random.random())))
            pause = min(pause * 2, ADMIT_POLL_MAX_S)
        return True

    def engine(self, ctx: QueryContext) -> Engine:
        return Engine(self.storage(ctx), self.qcfg.lookback_delta_ms,
                      limits=Limits(max_samples=self.qcfg.max_samples or (1 << 62)),
                      checkpoint=ctx.check)

    @staticmethod
    def _parse(expr: str | None) -> str:
        if not expr:
            raise ApiError("bad_data", 'invalid parameter "query": missing query expression')
        try:
            Engine.parse(expr)
        except QueryError as e:
            raise ApiError("bad_data", f'invalid parameter "query": {e}') from None
        return expr

    def _respond(self, res: Result, ctx: QueryContext, st: ResolutionStorage) -> Response:
        warnings = list(dict.fromkeys(ctx.warnings + res.stats.warnings))
        w = st.warning()
        if w:
            warnings.append(w)
        return Response(200, success_body(result_json(res), warnings), "application/json",
                        {NAMESPACES_HEADER: st.header()})

    # -- query endpoints ------------------------------------------------------------------------
    async def query(self, req: Request) -> Response:
        try:
            form = self.form(req)
            expr = self._parse(self.one(form, "query"))
            t = self.one(form, "time")
            t_ms = parse_time(t, "time") if t else int(time.time() * 1000)
            ctx = self._ctx(form, expr)
        except ApiError as e:
            return error(e.kind, str(e))

        def work(ctx: QueryContext) -> Response:
            eng = self.engine(ctx)
            return self._respond(eng.instant(expr, t_ms), ctx, eng.storage)

        return await self.run(req, ctx, work)

    async def query_range(self, req: Request) -> Response:
        try:
            form = self.form(req)
            expr = self._parse(self.one(form, "query"))
            for k in ("start", "end", "step"):
                if not self.one(form, k):
                    raise ApiError("bad_data", f'invalid parameter "{k}": missing')
            start = parse_time(self.one(form, "start") or "", "start")
            end = parse_time(self.one(form, "end") or "", "end")
            step = parse_duration(self.one(form, "step") or "", "step")
            if end < start:
                raise ApiError("bad_data", "end timestamp must not be before start time")
            if step <= 0:
                raise ApiError("bad_data", "zero or negative query resolution step widths "
                                           "are not accepted. Try a positive integer")
            if (end - start) // step + 1 > MAX_POINTS_PER_SERIES:
                raise ApiError("bad_data", "exceeded maximum resolution of 11,000 points per "
                                           "timeseries. Try decreasing the query resolution "
                                           "(?step=XX)")
            mp = self.one(form, "max_points")
            max_points = 0
            if mp:
                try:
                    max_points = int(mp)
                except ValueError:
                    max_points = -1
                if max_points < 3:
                    raise ApiError("bad_data", 'invalid parameter "max_points": expected an '
                                               f'integer >= 3, got "{mp}"')
            ctx = self._ctx(form, expr)
        except ApiError as e:
            return error(e.kind, str(e))

        def work(ctx: QueryContext) -> Response:
            eng = self.engine(ctx)
            res = eng.range(expr, start, end, step)
            if max_points:
                for s in res.matrix:
                    s.ts, s.values = lttb(s.ts, s.values, max_points)
            return self._respond(res, ctx, eng.storage)

        return await self.run(req, ctx, work)

    # -- metadata endpoints ------------------------------------------------------------------
    def _matchers(self, form: dict[str, list[str]], required: bool) -> list[list[Matcher]]:
        sels = form.get("match[]", [])
        if required and not sels:
            raise ApiError("bad_data", "no match[] parameter provided")
        out = []
        for s in sels:
            if _METRIC_NAME.fullmatch(s.strip()):  # also names PromQL reads as numbers: nan, inf
                out.append([Matcher("__name__", "=", s.strip())])
                continue
            try:
                node = Engine.parse(s)
            except QueryError as e:
                raise ApiError("bad_data", f'invalid parameter "match[]": {e}') from None
            if type(node).__name__ != "VectorSelector":
                raise ApiError("bad_data", f'invalid parameter "match[]": {s!r} is not a '
                                           "series selector")
            out.append(from_selector(node))
        return out

    def _range(self, form: dict[str, list[str]]) -> tuple[int | None, int | None]:
        s, e = self.one(form, "start"), self.one(form, "end")
        return (parse_time(s, "start") if s else None, parse_time(e, "end") if e else None)

    def _limit(self, form: dict[str, list[str]]) -> int:
        v = self.one(form, "limit")
        if not v:
            return 0
        try:
            n = int(v)
        except ValueError:
            n = -1
        if n < 0:
            raise ApiError("bad_data", f'invalid parameter "limit": expected a non-negative '
                                       f'integer, got "{v}"')
        return n

    async def _listing(self, req: Request, what: str,
                       fn: Callable[[ResolutionStorage, list[list[Matcher]], int | None,
                                     int | None], list]) -> Response:
        try:
            form = self.form(req)
            matchers = self._matchers(form, required=what == "series")
            mint, maxt = self._range(form)
            limit = self._limit(form)
            ctx = self._ctx(form, f"{what} {' '.join(form.get('match[]', []))}".strip())
        except ApiError as e:
            return error(e.kind, str(e))

        def work(ctx: QueryContext) -> Response:
            st = self.storage(ctx)
            items = fn(st, matchers, mint, maxt)
            warnings = list(ctx.warnings)
            if limit and len(items) > limit:
                items = items[:limit]
                warnings.append("results truncated due to limit")
            if what == "series":
                items = [dict(lb) for lb in items]
            resp = success(items, warnings)
            resp.headers[NAMESPACES_HEADER] = st.header()
            return resp

        return await self.run(req, ctx, work)

    async def series(self, req: Request) -> Response:
        return await self._listing(req, "series", lambda st, m, a, b: st.series(m, a, b))

    async def labels(self, req: Request) -> Response:
        return await self._listing(req, "labels",
                                   lambda st, m, a, b: st.label_names(m or None, a, b))

    async def label_values(self, req: Request) -> Response:
        name = req.path[len("/api/v1/label/"):-len("/values")]
        if not name or "/" in name:
            return error("bad_data", f"invalid label name: {name!r}")
        return await self._listing(req, "label values",
                                   lambda st, m, a, b: st.label_values(name, m or None, a, b))

    async def metadata(self, req: Request) -> Response:
        """Remote-write metadata (m3shm/storage/metadata.py) in Prometheus' shape,
        ``{name: [{type, help, unit}]}``, sorted by name; ``metric=`` picks one name,
        ``limit=`` caps the names (negative or absent: all)."""
        form = self.form(req)
        metric = self.one(form, "metric")
        try:
            limit = int(self.one(form, "limit") or -1)
        except ValueError:
            return error("bad_data", 'invalid parameter "limit": not a number')
        store = self.w.metadata
        await asyncio.get_running_loop().run_in_executor(self.w.pool, store.refresh)
        entries = store.all()
        names = [metric] if metric is not None else sorted(entries)
        out: dict[str, list[dict[str, str]]] = {}
        for name in names:
            e = entries.get(name)
            if e is None:
                continue
            if 0 <= limit <= len(out):
                break
            out[name] = [{"type": e.type_name, "help": e.help, "unit": e.unit}]
        return success(out)

    async def buildinfo(self, req: Request) -> Response:
        return success({"version": "2.42.0", "revision": f"m3shm-{m3shm.__version__}",
                        "branch": "m3shm", "buildUser": "m3shm", "buildDate": "",
                        "goVersion": "python3.11"})

    async def format_query(self, req: Request) -> Response:
        form = self.form(req)
        q = self.one(form, "query")
        if not q:
            return error("bad_data", 'invalid parameter "query": missing query expression')
        try:
            return success(Engine.parse(q).prettify())
        except QueryError as e:
            return error("bad_data", f'invalid parameter "query": {e}')

    async def running_queries(self, req: Request) -> Response:
        return success(self.registry.all_entries())

    def close(self) -> None:
        self._refresher.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)


def lttb(ts: np.ndarray, vals: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Largest-Triangle-Three-Buckets in C (csrc/lttb.c): at most ``threshold`` points."""
    n = len(ts)
    if n <= threshold:
        return ts, vals
    ts = np.ascontiguousarray(ts, dtype=np.int64)
    vals = np.ascontiguousarray(vals, dtype=np.float64)
    out = np.empty(threshold, dtype=np.uint32)
    k = lib.m3_lttb(ffi.from_buffer("int64_t[]", ts), ffi.from_buffer("double[]", vals), n,
                    threshold, ffi.from_buffer("uint32_t[]", out))
    idx = out[:k]
    return ts[idx], vals[idx]
