"""Prometheus HTTP API shapes: request parameters in, JSON bodies out, as Prometheus 2.42.

Times: parameters are unix seconds (float) or RFC 3339; in responses a timestamp is written as
Prometheus' ``MarshalTimestamp`` writes it (seconds, then ``.`` and three digits of ms unless
they are zero). Values are strings in ``strconv.FormatFloat(v, 'f', -1, 64)`` form: shortest
round-trip digits, never an exponent, ``NaN``, ``+Inf``, ``-Inf``. Errors are
``{"status":"error","errorType":...,"error":...}`` with Prometheus' HTTP codes.
"""

from __future__ import annotations

import json
import math
import threading
from datetime import datetime
from decimal import Decimal
from typing import Any

import numpy as np

from m3shm._native import ffi, lib
from m3shm.config import ConfigError, parse_duration_ms
from m3shm.errors import check
from m3shm.net.http import Response
from m3shm.query.engine import Result
from m3shm.query.labels import Labels

ERROR_STATUS = {"bad_data": 400, "execution": 422, "timeout": 503, "canceled": 499,
                "internal": 500, "not_found": 404, "unavailable": 503}
JSON = "application/json"


class ApiError(Exception):
    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind


def error(kind: str, msg: str) -> Response:
    body = json.dumps({"status": "error", "errorType": kind, "error": msg},
                      separators=(",", ":"))
    return Response(ERROR_STATUS[kind], body.encode(), JSON)


def success_body(data_json: str, warnings: list[str] | None = None) -> bytes:
    w = f',"warnings":{json.dumps(warnings)}' if warnings else ""
    return f'{{"status":"success","data":{data_json}{w}}}'.encode()


def success(data: Any, warnings: list[str] | None = None) -> Response:
    return Response(200, success_body(json.dumps(data, separators=(",", ":")), warnings), JSON)


# -- parameters -------------------------------------------------------------------------------

def parse_time(v: str, name: str) -> int:
    """Unix seconds (float) or RFC 3339 -> ms."""
    try:
        f = float(v)
        if math.isfinite(f):
            return int(round(f * 1000))
    except ValueError:
        pass
    try:
        return int(datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        raise ApiError("bad_data", f'invalid parameter "{name}": cannot parse "{v}" to a '
                                   "valid timestamp") from None


def parse_duration(v: str, name: str) -> int:
    """Seconds (float) or a Prometheus duration (``5m``, ``1h30m``) -> ms."""
    try:
        f = float(v)
        if math.isfinite(f) and f >= 0:
            return int(round(f * 1000))
        raise ApiError("bad_data", f'invalid parameter "{name}": cannot parse "{v}" to a '
                                   "valid duration")
    except ValueError:
        pass
    try:
        return parse_duration_ms(v, name)
    except ConfigError:
        raise ApiError("bad_data", f'invalid parameter "{name}": cannot parse "{v}" to a '
                                   "valid duration") from None


# -- results ----------------------------------------------------------------------------------

def fmt_value(v: float) -> str:
    s = repr(v)
    if s[-2:] == ".0":
        return s[:-2]
    if "e" in s or "n" in s:  # exponent form, nan, inf
        if v != v:
            return "NaN"
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        # repr's digits are the shortest that read back (as Go's); lay them out positionally
        # (numpy's format_float_positional(unique=True) is one digit longer at some powers
        # of two, e.g. 2**-24)
        return format(Decimal(s), "f")
    return s


def fmt_ts(t: int) -> str:
    sign = "-" if t < 0 else ""
    t = abs(t)
    s, ms = divmod(t, 1000)
    return f"{sign}{s}.{ms:03d}" if ms else f"{sign}{s}"


def metric_json(labels: Labels) -> str:
    return json.dumps(dict(labels), ensure_ascii=False, separators=(",", ":"))


def points_json_py(ts: np.ndarray, vals: np.ndarray) -> str:
    """``[t,"v"],...`` for a series' points, per point in Python (the reference for the C
    formatter below; tests compare the two)."""
    return ",".join(f'[{fmt_ts(t)},"{fmt_value(v)}"]' for t, v in zip(ts.tolist(),
                                                                     vals.tolist(), strict=True))


class _Scratch(threading.local):
    buf: np.ndarray = np.empty(0, dtype=np.uint8)


_scratch = _Scratch()


def points_json(ts: np.ndarray, vals: np.ndarray) -> str:
    """``[t,"v"],...`` for a series' points, formatted in C (csrc/json_points.c: shortest
    round-trip digits as Go's FormatFloat) into a reused per-thread buffer."""
    n = len(ts)
    if not n:
        return ""
    ts = np.ascontiguousarray(ts, dtype=np.int64)
    vals = np.ascontiguousarray(vals, dtype=np.float64)
    reprs = b""
    cap = n * 48
    while True:
        if len(_scratch.buf) < cap:
            _scratch.buf = np.empty(cap, dtype=np.uint8)
        buf = _scratch.buf
        out = ffi.cast("char *", ffi.from_buffer(buf))
        if reprs:
            got = lib.m3_json_points(ffi.from_buffer("int64_t[]", ts), reprs, len(reprs), n,
                                     out, len(buf))
        else:  # shortest digits computed in C from the doubles
            got = lib.m3_json_points_f(ffi.from_buffer("int64_t[]", ts),
                                       ffi.from_buffer("double[]", vals), n, out, len(buf))
        if got == lib.M3_ENOSPC:
            cap = int(lib.m3_json_points_bound(n))
            continue
        if got == lib.M3_ERANGE and not reprs:
            # a power of two only Gay's algorithm gets exactly right (csrc/json_points.c):
            # CPython's repr gives this series' shortest digits, C lays them out
            reprs = repr(vals.tolist()).encode("ascii")
            continue
        check(int(got), "formatting result points")
        return buf[:got].tobytes().decode("ascii")


def result_json(res: Result) -> str:
    if res.type == "scalar":
        assert res.scalar is not None
        t, v = res.scalar
        return f'{{"resultType":"scalar","result":[{fmt_ts(t)},"{fmt_value(v)}"]}}'
    if res.type == "string":
        assert res.string is not None
        t, s = res.string
        return f'{{"resultType":"string","result":[{fmt_ts(t)},{json.dumps(s)}]}}'
    if res.type == "vector":
        items = [f'{{"metric":{metric_json(s.labels)},"value":[{fmt_ts(s.t)},'
                 f'"{fmt_value(s.v)}"]}}' for s in res.vector]
        return f'{{"resultType":"vector","result":[{",".join(items)}]}}'
    items = [f'{{"metric":{metric_json(s.labels)},"values":[{points_json(s.ts, s.values)}]}}'
             for s in res.matrix]
    return f'{{"resultType":"matrix","result":[{",".join(items)}]}}'
