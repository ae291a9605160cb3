"""Rollup exactly once across FULL restarts (issue 8): the supervisor and every worker are
SIGKILLed together (one process group) at random points while 50 instances' counters (with
resets) are written, and the daemon is started again on the same data directory each time.

The shared memory is gone after such a kill: the series stage's open windows are rebuilt by
replaying the raw commit log from the finalise watermark, the group cells from the rollup
namespace's commit log (its ROLLUP_IN records and its own points). The rolled-up counter must
still be exact: its increase between any two of its window ends equals the sum of the
instances' raw increases between the same times (relative 1e-9), with nothing forwarded
twice (an input window re-forwarded from the replayed raw samples while its first forward is
replayed into the group too), nothing lost, and no group window emitted again with another
value (its ``Add`` total continues from the last stored point).

After the first restart one worker is SIGSTOPped for longer than ``forward_delay`` (a restart
slowed down on a loaded machine: one worker's replay or first rounds late), while the other
goes on: the group owners must wait for its re-forwarded inputs (the barrier, docs/rules.md
"Rollup forwarding"). Without the barrier this lost every group window whose inputs the
stalled worker re-forwarded after end + admission + forward_delay (counted late).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.test_daemon_harness import Daemon, now_ms
from tests.test_rollup_daemon import (
    RES_MS,
    Counters,
    check_counters,
    rollup_config,
    wait_rolled_up,
    write_until_ok,
)

CONFIG = rollup_config(8, 2)

PHASES = 3          # write, kill everything, start again: PHASES - 1 full restarts
STEP_MS = 250
STALL_S = 5         # > forward_delay + a finalise round, < admission


def start(d: Daemon) -> Daemon:
    # its own process group, so one killpg takes the supervisor and every worker at once
    return d.start(preexec_fn=os.setsid)


def kill_group(d: Daemon) -> None:
    assert d.proc is not None
    os.killpg(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(d.proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "workers outlived the SIGKILL"
        time.sleep(0.01)
    d.remove_shm()  # what a reboot would do: the next start creates it afresh


# one seed in `make test` (about 40 s); M3SHM_ROLLUP_RESTART_SEEDS=5 runs seeds 1..5
SEEDS = list(range(1, 1 + int(os.environ.get("M3SHM_ROLLUP_RESTART_SEEDS", "1"))))


@pytest.mark.parametrize("seed", SEEDS)
def test_rollup_exact_across_full_restarts(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    d = start(Daemon(tmp_path, workers=2, series=4096, arena="4MiB", extra=CONFIG))
    counters = Counters(seed=100 + seed)
    t_start = now_ms()
    ts = t_start
    kills: list[int] = []
    deadline = time.monotonic() + 150
    try:
        for phase in range(PHASES):
            # a random kill point: somewhere inside the finalise rounds (every second), after
            # 2.5 .. 4.5 s of writing
            steps = rnd.randrange(10, 18)
            for _ in range(steps):
                ts = max(ts + STEP_MS, now_ms())
                while now_ms() < ts:
                    time.sleep(0.005)
                write_until_ok(d, counters.step(ts), deadline)
            if phase < PHASES - 1:
                time.sleep(rnd.random())
                kills.append(now_ms())
                kill_group(d)
                start(d)
                if phase == 0:
                    # one worker of the new boot stalls for longer than forward_delay
                    pid = rnd.choice(d.workers())
                    os.kill(pid, signal.SIGSTOP)
                    try:
                        time.sleep(STALL_S)
                    finally:
                        os.kill(pid, signal.SIGCONT)
        got, page, info = wait_rolled_up(d, ts // RES_MS * RES_MS, deadline)
        check_counters(got, counters, ("kills at", kills, info))
        assert 'm3shm_rollup_records_unmatched_total{namespace="agg_1s_2d"} 0' in page, info
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
