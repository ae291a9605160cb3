"""The rollup barrier: a group window is final only once every source has forwarded it
(docs/rules.md "Rollup forwarding", *The barrier*; the marks: csrc/fwdmark.c, stats slot
``fwd_mark_ms`` in docs/formats/stats.md).

- **Sources** (every worker's raw Aggregator) publish a mark T after each complete finalise
  round at T: every rollup input window of the worker's shards final at T (``end + admission
  <= T``) has been forwarded. At start a worker raises its mark to the boot's replay
  watermark (windows final at it were forwarded before the crash); a restarted worker keeps
  its predecessor's mark (its cells are in shared memory, so the mark still holds).
- **Group owners** (the Aggregator of an aggregated namespace) take B = the smallest mark,
  then draw a sequence number of their segment and wait until their shards have applied
  every batch below it (:meth:`RollupBarrier.advance`): every forward covered by B is then in
  their group cells. Their drain and their finalise rounds run on the clock
  ``min(now, B + forward_delay)``: a group cell's admission is ``admission + forward_delay``,
  so a group window is final exactly when ``end + admission <= B`` (its inputs are all in)
  and ``end + admission + forward_delay <= now`` (today's schedule when every source is on
  time). A dead or stalled source holds every group window back: right (its values are on
  their way), logged when it lasts, and exported (``m3shm_rollup_barrier_lag_seconds``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from m3shm import stats as st
from m3shm._native import ffi, lib

log = logging.getLogger("m3shm.rollup")

SETTLE_S = 0.5        # longest wait for the shards to apply what was published below a seq
HOLD_LOG_MS = 10_000  # log when group windows have been held back longer than this
HOLD_LOG_EVERY_S = 30.0


def _marks(w: Any) -> tuple[Any, int] | None:
    """(pointer to worker 0's mark, workers) in the worker's stats file, or None (tests that
    run an Aggregator without one)."""
    sf = getattr(w, "statsfile", None)
    if sf is None:
        return None
    base = ffi.from_buffer("uint64_t[]", sf.slots)
    return base + st.HEADER_SLOTS + st.W_FWD_MARK_MS, sf.nworkers


def raise_mark(w: Any, t_ms: int) -> None:
    """Source: every rollup input window of worker ``w``'s shards final at ``t_ms`` is
    forwarded (never lowers the mark)."""
    m = _marks(w)
    if m is not None:
        lib.m3_fwd_mark_raise(m[0], st.WORKER_SLOTS, w.index, t_ms)


def marks_of(w: Any) -> list[int]:
    """Every worker's mark (0: none yet)."""
    sf = getattr(w, "statsfile", None)
    if sf is None:
        return []
    return [sf.worker(i).get(st.W_FWD_MARK_MS) for i in range(sf.nworkers)]


class RollupBarrier:
    """The group owner's side, for one aggregated namespace's Aggregator."""

    def __init__(self, agg: Any, forward_delay_ms: int) -> None:
        self.agg = agg
        self.forward_delay_ms = forward_delay_ms
        self.mark_ms = 0        # B: forwards up to it are applied here (0: none known yet)
        self._marks = _marks(agg.w)
        self._logged = 0.0

    def clock(self, now: int) -> int:
        """The time group cells are applied and finalised at."""
        if self._marks is None:
            return now
        return min(now, self.mark_ms + self.forward_delay_ms)

    def _settle(self, seq: int) -> bool:
        """Pool thread: wait until this worker's shards of the segment have applied every
        batch below ``seq`` (at most SETTLE_S; False if they did not)."""
        a = self.agg
        seg = a.seg
        deadline = time.monotonic() + SETTLE_S
        while not lib.m3_seq_settled(seg.base, seq):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        tails = seg.tails()
        per = seg.params.num_producers
        for s in range(seg.params.num_shards):
            if not a.w.lo <= s < a.w.hi:
                for p in range(per):
                    tails[s * per + p] = 0
        while not seg.caught_up(tails):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    async def advance(self, loop: Any, pool: Any) -> None:
        """Move B to the sources' smallest mark once every forward it covers is applied."""
        if self._marks is None:
            return
        ptr, n = self._marks
        b = int(lib.m3_fwd_mark_min(ptr, n, st.WORKER_SLOTS))
        if b > self.mark_ms:
            seq = int(lib.m3_seq_sync(self.agg.seg.base))
            if await loop.run_in_executor(pool, self._settle, seq):
                self.mark_ms = b
        self._maybe_log()

    def held_ms(self, now: int) -> int:
        """How long past their schedule group windows are held back now."""
        return max(0, now - self.clock(now)) if self._marks is not None else 0

    def _maybe_log(self) -> None:
        now = int(time.time() * 1000)
        held = self.held_ms(now)
        if held < HOLD_LOG_MS or time.monotonic() - self._logged < HOLD_LOG_EVERY_S:
            return
        a = self.agg
        if not a.store.totals().get("cells"):
            return  # no group cell waits
        self._logged = time.monotonic()
        marks = marks_of(a.w)
        slow = [f"worker {i} at {(now - m) / 1000:.1f}s ago" if m else f"worker {i}: none yet"
                for i, m in enumerate(marks) if m <= self.mark_ms]
        log.warning("worker %d: namespace %s: rollup group windows held back %.1fs, waiting "
                    "for sources to forward: %s (applied here up to %.1fs ago)", a.w.index,
                    a.watermark.removesuffix("-"),
                    held / 1000, ", ".join(slow) or "their last forwards",
                    (now - self.mark_ms) / 1000)
