"""Prometheus' PromQL test-script format, run against the in-memory store.

    load 5m
      http_requests{job="api", instance="0"}  0+10x10 _ stale 1 NaN
    clear
    eval instant at 50m sum by (job) (http_requests)
      {job="api"} 100
    eval_ordered instant at 50m sort(http_requests)
    eval_fail instant at 0 foo(
    eval range from 0 to 10m step 5m rate(http_requests[5m])
      {job="api", instance="0"} 0.03 0.03 _

Series values: ``a+bxn`` / ``a-bxn`` expand to n+1 values, ``_`` is no sample, ``_xn`` n of
them, ``stale`` a staleness marker. Expected values compare as Prometheus' tests do: equal,
both NaN, or within a relative 1e-6. ``eval range`` is an m3shm addition.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m3shm.query.blocks import STALE_NAN
from m3shm.query.engine import Engine, Result
from m3shm.query.errors import QueryError
from m3shm.query.labels import Labels, format_labels, from_pairs
from m3shm.query.storage import MemoryStore

EPSILON = 1e-6
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
            "w": 604_800_000, "y": 31_536_000_000}
_NUM = r"[-+]?(?:Inf|NaN|inf|nan|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
_EXPAND = re.compile(rf"^(?P<a>{_NUM})(?:(?P<op>[-+])(?P<b>{_NUM}))?x(?P<n>\d+)$")
_EVAL = re.compile(r"^eval(?P<mod>_fail|_ordered)?\s+instant\s+at\s+(?P<at>\S+)\s+(?P<expr>.+)$")
_EVAL_RANGE = re.compile(r"^eval(?P<mod>_fail)?\s+range\s+from\s+(?P<start>\S+)\s+to\s+"
                         r"(?P<end>\S+)\s+step\s+(?P<step>\S+)\s+(?P<expr>.+)$")
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


class ScriptError(Exception):
    """A malformed script line (file:line in the message)."""


def parse_duration(text: str) -> int:
    """Milliseconds of a Prometheus duration ("1h30m", "0", "-5m"); a bare number is seconds."""
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("-")
    if re.fullmatch(r"\d+(\.\d+)?", body):
        return sign * int(round(float(body) * 1000))
    pos, total = 0, 0
    for m in _DURATION.finditer(body):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNIT_MS[m.group(2)]
        pos = m.end()
    if pos != len(body) or not body:
        raise ScriptError(f"bad duration {text!r}")
    return sign * total


def parse_metric(text: str) -> tuple[Labels, str]:
    """(labels, rest of the line) of ``name{a="b"} rest``."""
    text = text.strip()
    m = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", text)
    pairs: list[tuple[str, str]] = []
    pos = 0
    if m:
        pairs.append(("__name__", m.group(0)))
        pos = m.end()
    if pos < len(text) and text[pos] == "{":
        pos += 1
        while True:
            while pos < len(text) and text[pos] in " ,":
                pos += 1
            if pos < len(text) and text[pos] == "}":
                pos += 1
                break
            lm = _LABEL.match(text, pos)
            if not lm:
                raise ScriptError(f"bad series {text!r}")
            value = lm.group(2).encode().decode("unicode_escape")
            pairs.append((lm.group(1), value))
            pos = lm.end()
    return from_pairs(pairs), text[pos:].strip()


def parse_number(tok: str) -> float:
    t = tok.lower().lstrip("+")
    if t in ("inf", "-inf", "nan"):
        return float(t)
    if t == "stale":
        return STALE_NAN
    return float(tok)


def expand_values(text: str) -> list[float | None]:
    """Series values notation to a list (None = no sample)."""
    out: list[float | None] = []
    for tok in text.split():
        if tok == "_":
            out.append(None)
        elif re.fullmatch(r"_x\d+", tok):
            out.extend([None] * int(tok[2:]))
        elif tok == "stale":
            out.append(STALE_NAN)
        elif m := _EXPAND.match(tok):
            a, n = parse_number(m.group("a")), int(m.group("n"))
            b = parse_number(m.group("b")) if m.group("b") else 0.0
            if m.group("op") == "-":
                b = -b
            out.extend(a + i * b for i in range(n + 1))
        else:
            out.append(parse_number(tok))
    return out


@dataclass
class Load:
    interval_ms: int
    series: list[tuple[Labels, list[float | None]]]


@dataclass
class Case:
    """One eval command with the loads in force when it runs."""

    path: str
    line: int
    expr: str
    loads: list[Load]
    start: int
    end: int = 0
    step: int = 0
    is_range: bool = False
    fail: bool = False
    ordered: bool = False
    expected: list[tuple[Labels | None, list[float | None]]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{Path(self.path).name}:{self.line}"


def parse_script(text: str, path: str = "<script>") -> list[Case]:
    cases: list[Case] = []
    loads: list[Load] = []
    lines = text.splitlines()
    i = 0

    def block(start: int) -> tuple[list[str], int]:
        body = []
        j = start
        while j < len(lines) and lines[j][:1] in (" ", "\t") and lines[j].strip():
            if not lines[j].strip().startswith("#"):
                body.append(lines[j].strip())
            j += 1
        return body, j

    while i < len(lines):
        raw = lines[i].strip()
        lineno = i + 1
        i += 1
        if not raw or raw.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        if raw == "clear":
            loads = []
            continue
        if raw.startswith("load "):
            body, i = block(i)
            load = Load(parse_duration(raw.split()[1]), [])
            for ln in body:
                labels, rest = parse_metric(ln)
                load.series.append((labels, expand_values(rest)))
            loads = [*loads, load]
            continue
        m = _EVAL.match(raw)
        r = _EVAL_RANGE.match(raw)
        if not m and not r:
            raise ScriptError(f"{where}: cannot read {raw!r}")
        body, i = block(i)
        if m:
            case = Case(path, lineno, m.group("expr"), loads, parse_duration(m.group("at")),
                        fail=m.group("mod") == "_fail", ordered=m.group("mod") == "_ordered")
        else:
            assert r is not None
            case = Case(path, lineno, r.group("expr"), loads, parse_duration(r.group("start")),
                        parse_duration(r.group("end")), parse_duration(r.group("step")),
                        is_range=True, fail=r.group("mod") == "_fail")
        for ln in body:
            if re.fullmatch(_NUM, ln.split()[0]) and len(ln.split()) == 1 and not case.is_range:
                case.expected.append(((), [parse_number(ln)]))
                continue
            labels, rest = parse_metric(ln)
            case.expected.append((labels, expand_values(rest)))
        cases.append(case)
    return cases


def build_store(loads: list[Load]) -> MemoryStore:
    store = MemoryStore()
    merged: dict[Labels, dict[int, float]] = {}
    for load in loads:
        for labels, vals in load.series:
            pts = merged.setdefault(labels, {})
            for k, v in enumerate(vals):
                if v is not None:
                    pts[k * load.interval_ms] = v
    for labels, pts in merged.items():
        ts = np.array(sorted(pts), dtype=np.int64)
        store.add(labels, ts, np.array([pts[t] for t in ts.tolist()], dtype=np.float64))
    return store


def almost_equal(a: float, b: float) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    if a == b:
        return True
    diff = abs(a - b)
    if a == 0 or b == 0 or diff < 2.2250738585072014e-308:
        return diff < EPSILON * 2.2250738585072014e-308
    return diff / (abs(a) + abs(b)) < EPSILON


def _fmt(v: float | None) -> str:
    return "_" if v is None else repr(v)


def check_case(case: Case, engine: Engine) -> list[str]:
    """Problems found running ``case`` (empty when it passes)."""
    try:
        if case.is_range:
            res = engine.range(case.expr, case.start, case.end, case.step)
        else:
            res = engine.instant(case.expr, case.start)
    except QueryError as e:
        return [] if case.fail else [f"unexpected error: {e}"]
    if case.fail:
        return ["expected an error, got a result"]
    got = _got(res, case)
    problems = []
    exp_keys = [lb for lb, _ in case.expected]
    if case.ordered and [lb for lb, _ in got] != exp_keys:
        problems.append(f"order: expected {exp_keys}, got {[lb for lb, _ in got]}")
    got_map = dict(got)
    for labels, vals in case.expected:
        if labels not in got_map:
            problems.append(f"missing {_name(labels)} {vals}")
            continue
        gv = got_map.pop(labels)
        same = len(gv) == len(vals) and all(
            (x is None and y is None) or (x is not None and y is not None and almost_equal(x, y))
            for x, y in zip(gv, vals, strict=True))
        if not same:
            problems.append(f"{_name(labels)}: expected {' '.join(map(_fmt, vals))}, "
                            f"got {' '.join(map(_fmt, gv))}")
    for labels, gv in got_map.items():
        problems.append(f"unexpected {_name(labels)} {' '.join(map(_fmt, gv))}")
    return problems


def _name(labels: Labels | None) -> str:
    return "scalar" if labels is None else format_labels(labels)


def _got(res: Result, case: Case) -> list[tuple[Labels | None, list[float | None]]]:
    if res.type == "scalar":  # compares like a vector of one series without labels
        assert res.scalar is not None
        return [((), [res.scalar[1]])]
    if res.type == "vector":
        return [(s.labels, [s.v]) for s in res.vector]
    if res.type == "matrix" and case.is_range:
        steps = np.arange(case.start, case.end + 1, case.step)
        out: list[tuple[Labels | None, list[float | None]]] = []
        for s in res.matrix:
            vals: list[float | None] = [None] * len(steps)
            for t, v in zip(s.ts.tolist(), s.values.tolist(), strict=True):
                vals[int((t - case.start) // case.step)] = v
            out.append((s.labels, vals))
        return out
    raise ScriptError(f"{case.name}: result of type {res.type} cannot be compared")


def run_file(path: str | Path) -> dict[str, list[str]]:
    """Every case of a script file -> its problems (for command-line use)."""
    text = Path(path).read_text()
    out = {}
    for case in parse_script(text, str(path)):
        out[case.name] = check_case(case, Engine(build_store(case.loads)))
    return out
