"""Compare Prometheus HTTP API results (as JSON) with a relative tolerance; NaN equals NaN."""

from __future__ import annotations

import math


def _num(s: str) -> float:
    return float(s.replace("+Inf", "inf").replace("-Inf", "-inf"))


def _close(a: str, b: str, rel: float) -> bool:
    x, y = _num(a), _num(b)
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    if math.isinf(x) or math.isinf(y):
        return x == y
    return abs(x - y) <= rel * max(abs(x), abs(y)) or abs(x - y) < 1e-300


def diff(a: dict | list, b: dict | list, rel: float = 1e-5) -> str | None:
    """None if the two `data` values agree, else a description of the first difference."""
    if isinstance(a, dict) and "resultType" in a:
        if a["resultType"] != b.get("resultType"):
            return f"result types {a['resultType']} != {b.get('resultType')}"
        if a["resultType"] in ("scalar", "string"):
            ra, rb = a["result"], b["result"]
            if ra[0] != rb[0] or not _close(ra[1], rb[1], rel):
                return f"{ra} != {rb}"
            return None
        a, b = a["result"], b["result"]
    key = lambda s: sorted(s["metric"].items())  # noqa: E731
    sa, sb = sorted(a, key=key), sorted(b, key=key)
    ka, kb = [key(s) for s in sa], [key(s) for s in sb]
    if ka != kb:
        return f"series differ: only left {[k for k in ka if k not in kb][:3]}, only right " \
               f"{[k for k in kb if k not in ka][:3]}"
    for x, y in zip(sa, sb, strict=True):
        px = x.get("values") or [x["value"]]
        py = y.get("values") or [y["value"]]
        if [p[0] for p in px] != [p[0] for p in py]:
            return f"{key(x)}: timestamps differ ({len(px)} vs {len(py)} points)"
        for p, q in zip(px, py, strict=True):
            if not _close(p[1], q[1], rel):
                return f"{key(x)} at {p[0]}: {p[1]} != {q[1]}"
    return None
