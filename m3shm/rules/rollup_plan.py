"""The group side of a rollup: from a series' rollup input to the rolled-up (group) series.

A series that matches a rollup rule feeds, for each of the rule's storage policies, one group
series in that policy's aggregated namespace (docs/rules.md, "Rollup pipelines"):

- its labels are :attr:`RollupInput.group` (``__name__`` = the rule's metricName plus the
  groupBy labels), in canonical form (m3shm.shm.canonical_labels) with their m3hash64 hash;
  the group series lives in the shard ``hash mod num_shards`` of the namespace's segment,
  owned there by whichever worker owns that shard (keyed by shard, never by worker);
- its cell is :func:`m3shm.rules.cells.rollup_group_cell`: the rollup's aggregations over the
  forwarded window values, the transforms after the rollup between consecutive windows, and an
  admission ``forward_delay`` longer than the inputs';
- the input's own series-stage cell is :func:`m3shm.rules.cells.rollup_series_cell`.

Forwarded records (type M3_REC_ROLLUP_IN, csrc/rollup.c) name the rule by :func:`rule_id`, a
32-bit digest of the rule's definition: stable across processes, restarts and rule-set
versions while the rule is unchanged, and different (new cells, a restarted rolled-up counter)
once it changes. Imports no numpy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from m3shm.rules.aggwin import CellParams
from m3shm.rules.cells import rollup_group_cell, rollup_series_cell
from m3shm.rules.matcher import Labels, RollupInput
from m3shm.rules.policy import StoragePolicy
from m3shm.rules.ruleset import RollupRule, RuleSet


def rule_id(rule: RollupRule) -> int:
    """Nonzero 32-bit id of a rollup rule's definition (name, filter, pipeline, policies)."""
    text = json.dumps(rule.to_dict(), sort_keys=True, separators=(",", ":"))
    v = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")
    return v or 1


def canonical(labels: Labels) -> bytes:
    """Canonical label bytes (docs/formats/shm.md, Record): sorted by name."""
    from m3shm.shm import canonical_labels

    return canonical_labels(dict(labels))


@dataclass(frozen=True)
class GroupPlan:
    """One (group series, policy, rule): where forwarded window values go and what they feed."""

    labels: Labels
    canon: bytes
    hash: int
    rule: int                   # rule_id
    policy: StoragePolicy
    series_cell: CellParams     # the input's series stage
    group_cell: CellParams      # the group's stage

    @property
    def namespace(self) -> str:
        return self.policy.namespace

    def shard(self, num_shards: int) -> int:
        return self.hash % num_shards


def group_plans(inp: RollupInput, admission_ms: int, forward_delay_ms: int,
                future_ms: int) -> list[GroupPlan]:
    """A plan per storage policy of the input's rule (one group series per aggregated
    namespace)."""
    from m3shm.shm import labels_hash

    canon = canonical(inp.group)
    h = labels_hash(canon)
    rid = rule_id(inp.rule)
    return [GroupPlan(inp.group, canon, h, rid, p,
                      rollup_series_cell(inp, p, admission_ms, future_ms),
                      rollup_group_cell(inp, p, admission_ms, forward_delay_ms, future_ms))
            for p in inp.policies]


def rules_by_id(rules: RuleSet) -> dict[int, RollupRule]:
    """The rollup rules of a set by rule_id (a group owner finds a forwarded record's rule)."""
    out: dict[int, RollupRule] = {}
    for r in rules.rollup:
        rid = rule_id(r)
        if rid in out and out[rid] != r:
            # two different rules with one 32-bit id: vanishingly rare, but never merge them
            raise ValueError(f"rollup rules {out[rid].name!r} and {r.name!r} have the same "
                             f"id {rid:#x}; rename one")
        out[rid] = r
    return out


def group_cell_for(rules: RuleSet, rid: int, group: Labels, policy: StoragePolicy,
                   admission_ms: int, forward_delay_ms: int, future_ms: int) -> CellParams | None:
    """The group cell a forwarded record of rule ``rid`` needs at the group owner, or None when
    the rule set has no such rule for this policy (a record of a rule since replaced: its
    windows are dropped and counted by the caller)."""
    rule = rules_by_id(rules).get(rid)
    if rule is None:
        return None
    policies = rule.policies or rules.default_policies
    if policy not in policies:
        return None
    inp = RollupInput(rule, group, policies)
    return rollup_group_cell(inp, policy, admission_ms, forward_delay_ms, future_ms)
