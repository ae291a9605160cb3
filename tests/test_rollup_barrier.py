"""Rollup group windows wait for every source (issue 8, the low watermark of docs/rules.md
"Rollup forwarding"): one source worker stalled or restarted alone for longer than
``forward_delay`` while the others go on loses no window and counts none twice.

A real daemon with two workers (each is a source of every group and the owner of some groups);
50 counters with resets rolled up by (service, endpoint). First one worker is SIGSTOPped for
longer than the forward delay (but less than the admission, so its own inputs are still on
time when it resumes), then the other is SIGSTOPped and SIGKILLed (the supervisor starts it
again; its cells are in shared memory). Without the barrier the group owners finalised the
windows the stalled worker had not forwarded yet by the clock (window end + admission +
forward_delay) and its values arrived late: counted in m3shm_rollup_late_values_total and lost.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.test_daemon_harness import Daemon, now_ms
from tests.test_rollup_daemon import (
    RES_MS,
    Counters,
    check_counters,
    rollup_config,
    wait_rolled_up,
    write_until_ok,
)

ADMISSION_S = 8
FORWARD_DELAY_S = 2
STALL_S = 5          # > forward_delay + a finalise round, < admission

CONFIG = rollup_config(ADMISSION_S, FORWARD_DELAY_S)

STEP_MS = 250


def check_exact(d: Daemon, counters: Counters, last_ts: int, deadline: float) -> None:
    """Every rolled-up counter's increase between any two of its window ends equals the raw
    increases of its instances (1e-9), and no value or sample was late."""
    got, page, info = wait_rolled_up(d, last_ts // RES_MS * RES_MS, deadline)
    check_counters(got, counters, info)
    assert 'm3shm_rollup_late_values_total{namespace="agg_1s_2d"} 0' in page, info
    assert "m3shm_downsample_late_samples_total 0" in page, info
    assert 'm3shm_rollup_records_unmatched_total{namespace="agg_1s_2d"} 0' in page, info


def write_for(d: Daemon, counters: Counters, ts: int, steps: int, deadline: float) -> int:
    for _ in range(steps):
        ts = max(ts + STEP_MS, now_ms())
        while now_ms() < ts:
            time.sleep(0.005)
        write_until_ok(d, counters.step(ts), deadline)
    return ts


def test_rollup_waits_for_a_stalled_or_restarted_source(tmp_path: Path) -> None:
    d = Daemon(tmp_path, workers=2, series=4096, arena="4MiB", extra=CONFIG).start()
    counters = Counters(seed=31)
    deadline = time.monotonic() + 120
    try:
        ts = write_for(d, counters, now_ms(), 12, deadline)
        first, second = d.workers()
        # a source stalled for longer than forward_delay; the other worker goes on (its
        # finalise rounds forward its inputs, its group cells would finalise by the clock)
        os.kill(first, signal.SIGSTOP)
        try:
            time.sleep(STALL_S)
        finally:
            os.kill(first, signal.SIGCONT)
        ts = write_for(d, counters, ts, 12, deadline)
        # a source stalled, then killed: the supervisor starts it again (shared memory kept)
        os.kill(second, signal.SIGSTOP)
        time.sleep(STALL_S - 1)
        os.kill(second, signal.SIGKILL)
        ts = write_for(d, counters, ts, 12, deadline)
        assert second not in d.workers()
        check_exact(d, counters, ts, deadline)
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def test_source_marks_only_rise_and_the_minimum_waits_for_every_worker(tmp_path: Path) -> None:
    """csrc/fwdmark.c over a real stats file: a mark is never lowered (a restarted worker's
    replay watermark does not undo its predecessor's rounds), and the minimum is 0 (hold
    everything) until every worker has one."""
    from m3shm import stats as st
    from m3shm._native import ffi, lib

    sf = st.StatsFile.create(str(tmp_path / "x.stats"), 3)
    marks = ffi.from_buffer("uint64_t[]", sf.slots) + st.HEADER_SLOTS + st.W_FWD_MARK_MS
    assert lib.m3_fwd_mark_min(marks, 3, st.WORKER_SLOTS) == 0
    lib.m3_fwd_mark_raise(marks, st.WORKER_SLOTS, 0, 5_000)
    lib.m3_fwd_mark_raise(marks, st.WORKER_SLOTS, 2, 7_000)
    assert lib.m3_fwd_mark_min(marks, 3, st.WORKER_SLOTS) == 0  # worker 1 has none yet
    lib.m3_fwd_mark_raise(marks, st.WORKER_SLOTS, 1, 6_000)
    assert lib.m3_fwd_mark_min(marks, 3, st.WORKER_SLOTS) == 5_000
    lib.m3_fwd_mark_raise(marks, st.WORKER_SLOTS, 0, 4_000)  # lower: ignored
    assert sf.worker(0).get(st.W_FWD_MARK_MS) == 5_000
    lib.m3_fwd_mark_raise(marks, st.WORKER_SLOTS, 0, 9_000)
    assert lib.m3_fwd_mark_min(marks, 3, st.WORKER_SLOTS) == 6_000
    assert [sf.worker(i).get(st.W_FWD_MARK_MS) for i in range(3)] == [9_000, 6_000, 7_000]
    del marks
    sf.unlink()
