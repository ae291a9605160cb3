"""From a series' plan to the aggregation cells (csrc/aggwin.c) that compute it.

- a mapping output (policy P, aggregations A): one cell, windows of P's resolution, mask A;
- a rollup input: a series cell per policy (its first stage) and, at the owner of the rolled-up
  id, one group cell per (group, policy) shared by every input series.

Rollup pipelines map onto cells like this (docs/rules.md says why):

- no ``aggregate`` step: the transforms before the rollup run per sample in the series cell
  (exact across counter resets inside a window); the series' window value is their Sum when
  they include Increase or PerSecond (the window's increase or rate), else their Last;
- ``aggregate: {type: T}`` first: the series cell aggregates T per window and the transforms
  before the rollup run between consecutive windows (M3's order);
- the group cell aggregates the rollup's aggregations over the forwarded window values and
  runs the transforms after the rollup between consecutive windows (Add makes a counter).
"""

from __future__ import annotations

import math

from m3shm.rules.aggwin import MAX_WINDOWS, CellParams
from m3shm.rules.matcher import Output, RollupInput
from m3shm.rules.policy import StoragePolicy


def ring_windows(policy: StoragePolicy, admission_ms: int, future_ms: int) -> int:
    """Open windows a cell needs so that every window still inside the admission window (and
    up to ``future_ms`` ahead of now) has a slot; capped at M3_AGG_MAX_WINDOWS."""
    need = math.ceil((admission_ms + future_ms) / policy.resolution_ms) + 1
    return max(1, min(MAX_WINDOWS, need))


def output_cell(out: Output, admission_ms: int, future_ms: int) -> CellParams:
    return CellParams(out.policy.resolution_ms, admission_ms, out.aggregations,
                      ring_windows(out.policy, admission_ms, future_ms))


def rollup_series_cell(inp: RollupInput, policy: StoragePolicy, admission_ms: int,
                       future_ms: int) -> CellParams:
    rule = inp.rule
    before = rule.transforms(after_rollup=False)
    nwin = ring_windows(policy, admission_ms, future_ms)
    first = rule.first_aggregation
    if first is not None:
        return CellParams(policy.resolution_ms, admission_ms, (first,), nwin, post=before)
    agg = "Sum" if {"Increase", "PerSecond"} & set(before) else "Last"
    return CellParams(policy.resolution_ms, admission_ms, (agg,), nwin, pre=before)


def rollup_group_cell(inp: RollupInput, policy: StoragePolicy, admission_ms: int,
                      forward_delay_ms: int, future_ms: int) -> CellParams:
    """The group's windows stay open forward_delay_ms longer than its inputs' so the inputs'
    finalised windows reach it before it is final."""
    adm = admission_ms + forward_delay_ms
    return CellParams(policy.resolution_ms, adm, inp.rule.rollup.aggregations,
                      ring_windows(policy, adm, future_ms),
                      post=inp.rule.transforms(after_rollup=True))
