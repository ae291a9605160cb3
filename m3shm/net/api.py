"""HTTP endpoints of a worker: remote write 1.0 and 2.0, /api/v1/export, /metrics, /ready,
/health.

Remote write: headers and size limits are checked first, then snappy decompression and the C
decoder (1.0 or 2.0, by the Content-Type's proto= parameter) run on the worker's thread pool
(the event loop never decodes); metadata the store does not have yet is written durably, then
the batch goes to the ingest pipeline (commit log, lanes) and the answer is 204, 400 naming the
first rejected series (the valid ones are still written, and the counts say so), 415 for a
body it cannot read, 503 with Retry-After when the daemon is overloaded, or 507 with
Retry-After when the disk is full (the commit log cannot be written). Every answer
carries X-Prometheus-Remote-Write-{Samples,Histograms,Exemplars}-Written. Every outcome is
counted in the worker's block of the stats file (per request, never per sample), which
/metrics sums.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import cramjam
import snappy

from m3shm import stats as st
from m3shm.net import metrics
from m3shm.net.http import Handler, Request, Response, text
from m3shm.net.rwdecode import Decoded, Limits, MalformedError, decode_rw1, decode_rw2
from m3shm.shm import parse_labels
from m3shm.storage.metadata_hashes import MetaHashSet
from m3shm.workers.ingest import DiskFull, Overloaded

if TYPE_CHECKING:
    from m3shm.config import NamespaceConfig
    from m3shm.net.promapi import PromApi
    from m3shm.workers.worker import Worker

log = logging.getLogger("m3shm.api")

RW_PATHS = ("/api/v1/prom/remote/write", "/api/v1/write")
# Content-Type proto= parameter -> remote write version
PROTOS = {"prometheus.WriteRequest": 1, "io.prometheus.write.v2.Request": 2}


class Api:
    def __init__(self, w: Worker) -> None:
        self.w = w
        self.st = w.stats
        self._prom: PromApi | None = None

    @property
    def prom(self) -> PromApi:
        """The query API, created on first use: importing it (numpy, the PromQL engine) takes
        ~0.4 s, which a restarted worker must not spend before it serves remote write. The
        worker warms it up on its pool right after it starts serving (warm_query)."""
        if self._prom is None:
            from m3shm.net.promapi import PromApi

            self._prom = PromApi(self.w)
        return self._prom

    async def warm_query(self) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self.w.pool, importlib.import_module, "m3shm.net.promapi")
        self.prom  # noqa: B018 - creates it on the loop (it starts a task there)

    @property
    def cfg(self):  # noqa: ANN201 - the worker's config, replaced whole by a reload
        return self.w.cfg

    def route(self, req: Request) -> Handler:
        if req.path.startswith("/prometheus/"):  # Prometheus' API also under /prometheus
            req.path = req.path[len("/prometheus"):]
        if req.path in RW_PATHS:
            return self.remote_write
        own = {"/api/v1/export": self.export, "/metrics": self.metrics, "/ready": self.ready,
               "/api/v1/admin/flush": self.admin_flush, "/api/v1/rules": self.rules,
               "/health": self.health, "/-/healthy": self.health,
               "/-/ready": self.ready}.get(req.path)
        if own is not None:
            return own
        return self.prom.route(req.path) or self.not_found

    async def not_found(self, req: Request) -> Response:
        return text(404, f"no such endpoint: {req.path}")

    async def health(self, req: Request) -> Response:
        return text(200, "ok")

    async def metrics(self, req: Request) -> Response:
        body = await asyncio.get_running_loop().run_in_executor(
            self.w.pool, metrics.render, self.w.statsfile, self.w.seg, self.w.nworkers,
            getattr(self.w, "aggregator", None),
            {name: rt.seg for name, rt in getattr(self.w, "ns", {}).items()})
        return Response(200, body, content_type="text/plain; version=0.0.4; charset=utf-8")

    async def ready(self, req: Request) -> Response:
        if self.w.seg.all_recovered() and not self.w.stopping:
            return text(200, "ready")
        return text(503, "recovering: replaying commit logs", **{"Retry-After": "1"})

    async def rules(self, req: Request) -> Response:
        """GET/PUT /api/v1/rules (m3shm/net/rulesapi.py)."""
        from m3shm.net import rulesapi

        return await rulesapi.handle(self.w, req)

    async def admin_flush(self, req: Request) -> Response:
        """Flush every closed block of every shard of every worker; 200 once durable."""
        if req.method != "POST":
            return text(405, "admin flush takes POST")
        if not self.w.seg.all_recovered() or self.w.flusher is None:
            return text(503, "recovering: retry once /ready says ready", **{"Retry-After": "1"})
        from m3shm.workers.flush import flush_everywhere

        status, msg = await flush_everywhere(self.w)
        return text(status, msg)

    # -- remote write ------------------------------------------------------------------------
    async def remote_write(self, req: Request) -> Response:
        """Remote write 1.0 and 2.0, chosen by the Content-Type's proto= parameter. Every
        answer carries the X-Prometheus-Remote-Write-*-Written counts."""
        lim = self.cfg.limits
        stats = self.st
        stats.add(st.W_REQUESTS)
        none = written_headers(0)
        if req.method != "POST":
            stats.reject_request("method")
            return text(405, "remote write takes POST", **none)
        if req.too_large:
            stats.reject_request("too_large")
            return text(400, f"request body is larger than limits.max_body_bytes="
                             f"{lim.max_body_bytes}", **none)
        ctype = req.headers.get("content-type", "application/x-protobuf")
        base, _, params = ctype.partition(";")
        if base.strip().lower() != "application/x-protobuf":
            stats.reject_request("unsupported_media_type")
            return text(415, f"unsupported Content-Type {ctype!r}: remote write takes "
                             "application/x-protobuf", **none)
        proto = re.search(r"proto=\"?([^;\s\"]+)", params)
        version = PROTOS.get(proto.group(1) if proto else "prometheus.WriteRequest")
        if version is None:
            assert proto is not None
            stats.reject_request("unsupported_media_type")
            return text(415, f"unsupported protobuf message {proto.group(1)!r}: this daemon "
                             "reads prometheus.WriteRequest (remote write 1.0) and "
                             "io.prometheus.write.v2.Request (remote write 2.0)", **none)
        enc = req.headers.get("content-encoding", "snappy").strip().lower()
        if enc != "snappy":
            stats.reject_request("unsupported_media_type")
            return text(415, f"unsupported Content-Encoding {enc!r}: remote write bodies are "
                             "snappy block-compressed", **none)
        if self.w.stopping:
            stats.reject_request("shutting_down")
            return text(503, "shutting down", **{"Retry-After": "1"}, **none)
        now = int(time.time() * 1000)
        ns = self.cfg.raw_namespace
        # warm writes reach back bufferPast; cold writes (when on) back to retention
        oldest = ns.retention_ms if ns.cold_writes else ns.buffer_past_ms
        limits = Limits(min_ts=now - oldest,
                        max_ts=now + ns.buffer_future_ms,
                        num_shards=self.cfg.shards, max_labels=lim.max_labels,
                        max_name_bytes=lim.max_label_name_bytes,
                        max_value_bytes=lim.max_label_value_bytes,
                        max_series=lim.max_series_per_request)
        loop = asyncio.get_running_loop()
        store = self.w.metadata
        try:
            d = await loop.run_in_executor(self.w.pool, _decode, req.body,
                                           lim.max_decompressed_bytes, limits, version,
                                           store.known)
        except _BadBody as e:
            stats.reject_request(e.reason)
            return text(400, str(e), **none)
        stats.add(st.W_SAMPLES_RECEIVED, d.samples_ok + d.samples_bad)
        if d.metadata:  # only entries not stored yet: durable before anything is acked
            try:
                await loop.run_in_executor(self.w.pool, store.update, d.metadata, version)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    stats.reject_request("disk_full", d.samples_ok + d.samples_bad, "disk_full")
                    return text(507, f"disk full: metadata cannot be written ({e}); nothing "
                                     "of this request was stored; retry later",
                                **{"Retry-After": "1"}, **none)
                stats.reject_request("overloaded", d.samples_ok + d.samples_bad, "overloaded")
                return text(503, f"overloaded: metadata write failed: {e}; retry later",
                            **{"Retry-After": "1"}, **none)
        adm = None
        if d.length:
            try:
                adm = await self.w.pipeline.submit(d.batch, d.length, d.records)
            except DiskFull as e:
                stats.reject_request("disk_full", d.samples_ok + d.samples_bad, "disk_full")
                return text(507, f"{e}; retry later", **{"Retry-After": "1"}, **none)
            except Overloaded as e:
                why = "shutting_down" if self.w.stopping else "overloaded"
                stats.reject_request(why, d.samples_ok + d.samples_bad, why)
                return text(503, f"overloaded: {e}; retry later", **{"Retry-After": "1"},
                            **none)
        rej_s, rej_msg = 0, ""
        if adm is not None and adm.rejected_records:
            rej_s, rej_msg = adm.rejected_samples, adm.message
        stats.add(st.W_SAMPLES_WRITTEN, d.samples_ok - rej_s)
        hdrs = written_headers(d.samples_ok - rej_s)
        if d.reason or rej_s:
            stats.reject_request("too_large" if d.reason == "too_many_series" else
                                 "invalid_series" if d.reason else "segment_full")
            if d.samples_bad:
                stats.reject_samples(d.reason or "malformed", d.samples_bad)
            if rej_s:
                stats.reject_samples("segment_full", rej_s)
            first = d.message if d.reason else rej_msg
            if d.reason in ("too_old", "too_new"):
                first += " " + accepted_window(ns)
            extra = "".join(f"; {n} {what} rejected" for n, what in (
                (d.histograms_bad, "histogram samples"), (d.exemplars_bad, "exemplars"),
                (d.meta_bad, "metadata entries")) if n)
            return text(400, f"{first}\nwritten: {d.samples_ok - rej_s} samples; rejected: "
                             f"{d.samples_bad + rej_s} samples of {d.series_bad} series "
                             f"(+{rej_s} samples over capacity){extra}", **hdrs)
        return Response(204, headers=hdrs)

    # -- export ------------------------------------------------------------------------------
    async def export(self, req: Request) -> Response:
        matches = req.query.get("match[]", []) + req.query.get("match", [])
        if not matches:
            return text(400, "missing match[] parameter, e.g. match[]={__name__=\"up\"}")
        from m3shm.net.promjson import ApiError

        try:
            selectors = self.prom._matchers({"match[]": matches}, required=True)
            start = _parse_time(req.query.get("start", [None])[0], -(1 << 62), "start")
            end = _parse_time(req.query.get("end", [None])[0], 1 << 62, "end")
        except (ValueError, ApiError) as e:
            return text(400, f"match[]: {e}" if isinstance(e, ApiError) else str(e))
        # see everything acknowledged before this request: wait until every shard applied
        # what was published before now
        seg = self.w.seg
        tails = seg.tails()
        deadline = time.monotonic() + 10
        while not seg.caught_up(tails):
            if time.monotonic() > deadline:
                return text(503, "shards are behind; retry", **{"Retry-After": "1"})
            await asyncio.sleep(0.001)
        return Response(200, content_type="application/stream+json",
                        stream=self._export_stream(selectors, start, end))

    async def _export_stream(self, selectors: list, start: int,
                             end: int) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        seg = self.w.seg
        index = self.prom.index
        try:  # series from the reverse index (any matchers), read shard by shard
            groups = dict(await loop.run_in_executor(self.w.pool, _export_groups, index,
                                                     selectors))
        except ValueError as e:
            yield f'{{"error":{json.dumps(str(e))}}}\n'.encode()
            return
        ns = self.cfg.raw_namespace.name
        for shard in range(seg.params.num_shards):
            chunk = await loop.run_in_executor(self.w.pool, _export_shard, seg,
                                               self.w.flushed_store, ns, shard,
                                               groups.get(shard, []), selectors, start, end)
            if chunk:
                yield chunk


class _BadBody(ValueError):
    def __init__(self, msg: str, reason: str = "malformed") -> None:
        super().__init__(msg)
        self.reason = reason  # one of stats.REQUEST_REASONS


def _dur(ms: int) -> str:
    for unit, n in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= n and ms % n == 0:
            return f"{ms // n}{unit}"
    return f"{ms}ms"


def accepted_window(ns: NamespaceConfig) -> str:
    """The time window a namespace accepts, for "too old" / "too new" answers."""
    if ns.cold_writes:
        return (f"(namespace {ns.name!r} accepts now-{_dur(ns.retention_ms)} (retention, "
                f"cold writes on) .. now+{_dur(ns.buffer_future_ms)} (bufferFuture))")
    return (f"(namespace {ns.name!r} accepts now-{_dur(ns.buffer_past_ms)} (bufferPast) .. "
            f"now+{_dur(ns.buffer_future_ms)} (bufferFuture); older samples are refused "
            "because coldWrites is off)")


def written_headers(samples: int) -> dict[str, str]:
    """The remote write 2.0 spec's counts of what a request wrote (sent for 1.0 too)."""
    return {"X-Prometheus-Remote-Write-Samples-Written": str(samples),
            "X-Prometheus-Remote-Write-Histograms-Written": "0",
            "X-Prometheus-Remote-Write-Exemplars-Written": "0"}


def _decode(body: bytes, max_decompressed: int, limits: Limits, version: int,
            known: MetaHashSet) -> Decoded:  # runs on the pool
    try:
        n = cramjam.snappy.decompress_raw_len(body) if body else 0
    except Exception as e:  # noqa: BLE001 - any library error means a bad body
        raise _BadBody(f"malformed snappy body: {e}") from None
    if n > max_decompressed:
        raise _BadBody(f"decompressed body would be {n} bytes, more than "
                       f"limits.max_decompressed_bytes={max_decompressed}", "too_large")
    try:
        raw = snappy.uncompress(body) if body else b""
    except Exception as e:  # noqa: BLE001
        raise _BadBody(f"malformed snappy body: {e}") from None
    try:
        return (decode_rw2 if version == 2 else decode_rw1)(raw, limits, known)
    except MalformedError as e:
        raise _BadBody(str(e)) from None


def _parse_time(v: str | None, default: int, key: str) -> int:
    if v is None or v == "":
        return default
    try:
        return int(float(v) * 1000)
    except ValueError:
        pass
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        raise ValueError(f"{key}: expected unix seconds or RFC3339, got {v!r}") from None


def _fmt_values(vs) -> str:  # VictoriaMetrics style: integers without ".0"; NaN, +Inf, -Inf bare
    out = []
    for v in vs.tolist():
        if v != v:
            out.append("NaN")
        elif math.isinf(v):
            out.append("+Inf" if v > 0 else "-Inf")
        elif v == int(v) and abs(v) < 1e15:
            out.append(str(int(v)))
        else:
            out.append(repr(v))
    return ",".join(out)


def _export_groups(index, selectors: list) -> list:  # runs on the pool
    index.refresh()
    sel = index.select_union(selectors)
    return [(shard, slots.tolist()) for shard, _, slots, _ in sel.by_shard()]


def _export_shard(seg, store, namespace: str, shard: int, slots: list[int], selectors: list,
                  start: int, end: int) -> bytes:  # runs on the pool
    """One shard's matching series: flushed volumes (oldest block first, series found through
    each block's reverse index) then shared memory, merged per series with the last write of
    a timestamp winning (shm is newest)."""
    import numpy as np

    from m3shm import codec
    from m3shm.errors import CorruptError

    parts: dict[bytes, list[tuple]] = {}
    errors: list[str] = []  # corrupt files: named in the answer, the rest is still read
    for fid in store.volumes(namespace, shard, start, end, errors):
        try:
            fs = store.open_newest(fid)
            if fs is None:
                continue
            with store.reverse_index(fs.fid) as ri:
                want = set(np.unique(np.concatenate([ri.select(m) for m in selectors]))
                           .tolist())
        except CorruptError as e:
            errors.append(str(e))
            continue
        if not want:
            continue
        for pos, (sid, _h, block) in enumerate(fs.entries()):
            if pos not in want:
                continue
            if isinstance(block, CorruptError):
                if str(block) not in errors:  # a bad frame fails each series of its group
                    errors.append(str(block))
                continue
            ts, vs = codec.decode(block)
            sel = (ts >= start) & (ts <= end)
            if sel.any():
                parts.setdefault(sid, []).append((ts[sel], vs[sel]))
    with seg.reading():  # a slot read here is not reused before the section ends
        for slot in slots:
            info = seg.series_info(shard, slot)
            if info is None:
                continue  # expired since the index saw it
            ts, vs = seg.read_series(shard, slot, start, end)
            if len(ts):
                parts.setdefault(info.labels, []).append((ts, vs))
    lines = []
    for canon, ps in parts.items():
        if len(ps) == 1:
            ts, vs = ps[0]
        else:
            ts = np.concatenate([p[0] for p in ps])
            vs = np.concatenate([p[1] for p in ps])
            order = np.argsort(ts, kind="stable")
            ts, vs = ts[order], vs[order]
            last = np.r_[ts[1:] != ts[:-1], True]  # the last write of a timestamp wins
            ts, vs = ts[last], vs[last]
        metric = json.dumps(parse_labels(canon), ensure_ascii=False, separators=(",", ":"))
        stamps = ",".join(map(str, ts.tolist()))
        lines.append(f'{{"metric":{metric},"values":[{_fmt_values(vs)}],'
                     f'"timestamps":[{stamps}]}}\n')
    for e in errors:
        log.warning("export: %s", e)
        lines.append(f'{{"error":{json.dumps(e)}}}\n')
    return "".join(lines).encode()
