"""Check the expected values of tests/promql/*.test against a real Prometheus (promtool).

    .venv/bin/python tests/promql/reference.py tests/promql/*.test          # report
    .venv/bin/python tests/promql/reference.py --fill tests/promql/new.test # fill empty evals

Each group of `eval instant` cases that share their `load`s becomes one `promtool test rules`
unit test with an empty expectation; promtool then prints what Prometheus computed, which is
compared with the script's expectation (or, with --fill, written into evals that have none).
Cases whose loads mix intervals, `eval range` and `eval_fail` cases are not checked here.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from m3shm.query.blocks import STALE_BITS
from m3shm.query.labels import format_labels
from m3shm.query.script import Case, almost_equal, parse_metric, parse_script

_GOT = re.compile(r'expr: "(?P<expr>(?:[^"\\]|\\.)*)", time: (?P<time>\S+),\n\s+exp:.*\n'
                  r"\s+got: (?P<got>.*)")
_ERR = re.compile(r'expr: "(?P<expr>(?:[^"\\]|\\.)*)", time: (?P<time>\S+), err: (?P<err>.*)')
_SAMPLE = re.compile(r'(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\}) (\S+?)(?:,|$)')


def _value_token(v: float | None) -> str:
    if v is None:
        return "_"
    if math.isnan(v):
        import numpy as np
        return "stale" if np.float64(v).view(np.uint64) == STALE_BITS else "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _labels_text(text: str) -> str:
    return format_labels(parse_metric(text)[0]) or "{}"


def _unit(cases: list[Case]) -> dict:
    loads = cases[0].loads
    series = []
    for load in loads:
        for labels, vals in load.series:
            series.append({"series": format_labels(labels) if labels else "{}",
                           "values": " ".join(_value_token(v) for v in vals)})
    return {"interval": f"{loads[0].interval_ms}ms", "input_series": series,
            "promql_expr_test": [{"expr": c.expr, "eval_time": f"{c.start}ms",
                                  "exp_samples": []} for c in cases]}


def reference(cases: list[Case]) -> dict[tuple[str, int], list[tuple[str, float]] | str]:
    """(expr, ms) -> Prometheus' samples (labels text, value)."""
    groups: dict[int, list[Case]] = {}
    for c in cases:
        if c.is_range or not c.loads:
            continue
        if len({ld.interval_ms for ld in c.loads}) != 1:
            continue
        groups.setdefault(id(c.loads), []).append(c)
    doc = {"rule_files": [], "evaluation_interval": "1m",
           "tests": [_unit(g) for g in groups.values()]}
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        json.dump(doc, f)
    out = subprocess.run(["promtool", "test", "rules", f.name], capture_output=True, text=True)
    got: dict[tuple[str, int], list[tuple[str, float]] | str] = {}
    text = out.stdout + out.stderr
    for m in _GOT.finditer(text):
        expr = json.loads(f'"{m.group("expr")}"')
        t = m.group("time")
        ms = _duration_ms(t)
        body = m.group("got").strip()
        samples = [] if body == "nil" else [(lb, float(v)) for lb, v in _SAMPLE.findall(body)]
        got[(expr, ms)] = samples
    for m in _ERR.finditer(text):
        got[(json.loads(f'"{m.group("expr")}"'), _duration_ms(m.group("time")))] = "error"
    if out.returncode and not got:
        print(text, file=sys.stderr)
    return got


def _duration_ms(text: str) -> int:
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)(ms|h|m|s)", text):
        total += float(num) * {"ms": 1, "s": 1e3, "m": 6e4, "h": 3.6e6}[unit]
    return int(round(total))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fill", action="store_true")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    bad = 0
    for path in args.files:
        text = Path(path).read_text()
        cases = parse_script(text, path)
        got = reference(cases)
        lines = text.splitlines()
        inserts: dict[int, list[str]] = {}
        for c in cases:
            key = (c.expr, c.start)
            if key not in got:
                continue
            ref = got[key] or []
            if c.fail or ref == "error":
                if c.fail != (ref == "error"):
                    bad += 1
                    print(f"{c.name}: {c.expr}: script expects "
                          f"{'an error' if c.fail else 'a result'}, Prometheus: {ref}")
                continue
            if not c.expected:
                if args.fill:
                    inserts[c.line] = [f"  {_labels_text(lb)} {_value_token(v)}" for lb, v in ref]
                elif ref:
                    print(f"{c.name}: no expectation; Prometheus: {ref}")
                continue
            mine = {format_labels(lb) if lb else "{}": v[0] for lb, v in c.expected
                    if lb is not None}
            theirs = {format_labels(parse_metric(lb)[0]) or "{}": v for lb, v in ref}
            scalar = [v[0] for lb, v in c.expected if lb is None]
            if scalar:
                mine = {"{}": scalar[0]}
            ok = mine.keys() == theirs.keys() and all(
                almost_equal(mine[k], theirs[k]) for k in mine if mine[k] is not None)
            if not ok:
                bad += 1
                print(f"{c.name}: {c.expr}\n  script:     {mine}\n  prometheus: {theirs}")
        if inserts:
            for line in sorted(inserts, reverse=True):
                lines[line:line] = inserts[line]
            Path(path).write_text("\n".join(lines) + "\n")
    print(f"{bad} disagreement(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
