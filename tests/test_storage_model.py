"""Stateful test of the storage engine against a reference model (hypothesis).

One daemon (2 workers, blocks of 2 s, bufferPast 1 s, cold writes on) takes random
interleavings of in-order, out-of-order, duplicate-timestamp (overwrite) and cold writes for a
few series, admin flushes, clean restarts and SIGKILL of every process. After every step the
data read back through /api/v1/export and /api/v1/query_range equals the model: a dict of
series -> {timestamp: value} where the last acknowledged write of a timestamp wins, and, for the
range query, at each step the newest sample within the 5 minute lookback (closed window, as
Prometheus 2.x). Each example uses its own metric name, so examples share the daemon but not
data. Sizes follow HYPOTHESIS_PROFILE (tests/conftest.py): ``ci`` stays well under 30 s."""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import urllib.parse

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from test_daemon_harness import Daemon, now_ms

CFG = """
namespaces:
  - {name: default, retention: 1h, blockSize: 2s, bufferPast: 1s, bufferFuture: 1s,
     coldWrites: true}
flush: {interval: 1h}
"""
LOOKBACK_MS = 5 * 60 * 1000
SERIES = 2
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "quick")
EXAMPLES = {"ci": 3, "quick": 4}.get(PROFILE, 25)
STEPS = {"ci": 12, "quick": 15}.get(PROFILE, 40)

_daemon: Daemon | None = None
_names = itertools.count()
_values = itertools.count()


class StorageModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert _daemon is not None
        self.d = _daemon
        self.name = f"sm{next(_names)}"
        self.model: dict[str, dict[int, float]] = {}

    @initialize()
    def start_with_flushed_data(self) -> None:
        """Every example starts with a flushed volume per series (samples of closed blocks),
        so a later cold overwrite and flush exercises the volume N+1 merge at once."""
        for i in range(SERIES):
            t = now_ms() - 10_000 - 1000 * i
            self._write(i, [(t + 5 * k, self._value()) for k in range(3)])
        self.flush()

    # -- writes ------------------------------------------------------------------------------
    def _write(self, i: int, samples: list[tuple[int, float]]) -> None:
        code, body, _ = self.d.write([({"__name__": self.name, "i": str(i)}, samples)])
        assert code == 204, body
        self.model.setdefault(str(i), {}).update(dict(samples))

    def _value(self) -> float:
        return next(_values) + 0.5  # every write distinct: the last one must win

    @rule(i=st.integers(0, SERIES - 1), n=st.integers(1, 3))
    def write_in_order(self, i: int, n: int) -> None:
        t = max(now_ms(), max(self.model.get(str(i), {0: 0})) + 1)
        self._write(i, [(t + k, self._value()) for k in range(n)])

    @rule(i=st.integers(0, SERIES - 1), back=st.integers(1, 900))
    def write_out_of_order(self, i: int, back: int) -> None:
        self._write(i, [(now_ms() - back, self._value())])

    @rule(i=st.integers(0, SERIES - 1), pick=st.integers(0, 1 << 16), then_flush=st.booleans())
    def write_duplicate_timestamp(self, i: int, pick: int, then_flush: bool) -> None:
        """Overwrite a timestamp already written: in memory, or (cold) in a flushed block,
        whose next flush merges volume N with it into volume N+1."""
        have = sorted(self.model.get(str(i), {}))
        if have:
            self._write(i, [(have[pick % len(have)], self._value())])
            if then_flush:
                self.flush()

    @rule(i=st.integers(0, SERIES - 1), back=st.integers(3_100, 600_000), n=st.integers(1, 3),
          then_flush=st.booleans())
    def write_cold(self, i: int, back: int, n: int, then_flush: bool) -> None:
        """Samples of closed blocks (so a flush right after writes them)."""
        t = now_ms() - back
        self._write(i, [(t + 7 * k, self._value()) for k in range(n)])
        if then_flush:
            self.flush()

    # -- time, flushes, restarts -------------------------------------------------------------
    @rule()
    def let_blocks_close(self) -> None:
        time.sleep(1.5)

    @rule()
    def flush(self) -> None:
        code, body = self.d.post("/api/v1/admin/flush", b"")[:2]
        assert code == 200, body

    @rule()
    def restart_clean(self) -> None:
        assert self.d.stop() == 0
        self.d.start()

    @rule()
    def restart_sigkill(self) -> None:
        self.d.kill_all()
        self.d.start()

    # -- reads -------------------------------------------------------------------------------
    @invariant()
    def export_equals_model(self) -> None:
        got = {dict(k)["i"]: v for k, v in self.d.export_map(self.name).items()}
        want = {i: s for i, s in self.model.items() if s}
        assert got == want

    @invariant()
    def query_range_equals_model(self) -> None:
        ts = [t for s in self.model.values() for t in s]
        if not ts:
            return
        start, end = min(ts), max(ts) + 1000
        step = max(1, math.ceil((end - start) / 150))
        q = urllib.parse.urlencode({"query": self.name, "start": f"{start / 1000:.3f}",
                                    "end": f"{end / 1000:.3f}", "step": f"{step / 1000:.3f}"})
        code, body = self.d.get(f"/api/v1/query_range?{q}")
        assert code == 200, body
        got = {r["metric"]["i"]: [(round(float(t) * 1000), float(v)) for t, v in r["values"]]
               for r in json.loads(body)["data"]["result"]}
        want = {}
        steps = range(start, end + 1, step)
        for i, s in self.model.items():
            order = sorted(s)
            pts = []
            for at in steps:
                inside = [t for t in order if at - LOOKBACK_MS <= t <= at]
                if inside:
                    pts.append((at, s[inside[-1]]))
            if pts:
                want[i] = pts
        assert got == want


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    global _daemon
    d = Daemon(tmp_path_factory.mktemp("model"), workers=2, extra=CFG).start()
    _daemon = d
    try:
        yield d
    finally:
        _daemon = None
        if d.proc is not None and d.proc.poll() is None:
            assert d.stop() == 0


def test_storage_matches_model(daemon):
    run_state_machine_as_test(
        StorageModel, settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS,
                                        deadline=None))
