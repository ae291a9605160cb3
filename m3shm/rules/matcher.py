"""A compiled rule set: which rules a series matches, decided once when a series is first seen.

:meth:`CompiledRules.match` takes a label set and returns a :class:`SeriesPlan`: whether the
raw series is stored, the aggregated streams of the series itself (policy -> aggregations),
and the rollup groups it feeds. Matching is per series, never per sample.

Cheap with many rules: rules whose filter pins the metric name to a literal
(``__name__:http_requests_total``) sit in a dict, those with a literal prefix
(``__name__:http_*``) in a dict per prefix length; only the rest are tried one by one. Then
each candidate's terms are checked (literal / prefix compares, else one anchored regex).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from m3shm.rules.filters import NAME, Filter
from m3shm.rules.policy import StoragePolicy
from m3shm.rules.ruleset import AGGREGATIONS, DEFAULT_AGGREGATION, RollupRule, RuleSet

# Label added to an aggregated series when its (series, policy) keeps several aggregations.
AGG_LABEL = "m3_aggregation"

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Output:
    """One aggregated stream of the series itself: a policy and its aggregations."""

    policy: StoragePolicy
    aggregations: tuple[str, ...]
    rules: tuple[str, ...]          # the rules that asked for it ("default" for the defaults)


@dataclass(frozen=True)
class RollupInput:
    """The series feeds rollup group ``group`` (the rolled-up series' labels) of ``rule``."""

    rule: RollupRule
    group: Labels
    policies: tuple[StoragePolicy, ...]


@dataclass(frozen=True)
class SeriesPlan:
    version: int                    # of the rule set that made the plan
    store_raw: bool
    outputs: tuple[Output, ...]
    rollups: tuple[RollupInput, ...]


def output_labels(labels: Mapping[str, str], agg: str, naggs: int) -> Labels:
    """Labels of the aggregated series for ``agg``: the series' own when it keeps one
    aggregation for the policy, else with ``m3_aggregation="<agg lower-case>"`` added."""
    d = dict(labels)
    if naggs > 1:
        d[AGG_LABEL] = agg.lower()
    return tuple(sorted(d.items()))


class CompiledRules:
    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self._filters: list[tuple[Filter, int]] = []  # (filter, rule index); mapping first
        allr: list[Filter] = [r.filter for r in rules.mapping] + [r.filter for r in rules.rollup]
        self._nmap = len(rules.mapping)
        self._exact: dict[str, list[int]] = {}
        self._prefix: dict[int, dict[str, list[int]]] = {}
        self._scan: list[int] = []
        for i, f in enumerate(allr):
            t = f.term(NAME)
            if t is not None and not t.negate and t.literal is not None:
                self._exact.setdefault(t.literal, []).append(i)
            elif t is not None and not t.negate and t.prefix is not None:
                self._prefix.setdefault(len(t.prefix), {}).setdefault(t.prefix, []).append(i)
            else:
                self._scan.append(i)
        self._all = allr

    def matching(self, labels: Mapping[str, str]) -> list[int]:
        """Indexes of the rules whose filters match (mapping rules first, then rollup rules,
        each in rule order)."""
        name = labels.get(NAME, "")
        cand = list(self._scan)
        cand += self._exact.get(name, ())
        for n, by in self._prefix.items():
            cand += by.get(name[:n], ())
        cand.sort()
        return [i for i in cand if self._all[i].matches(labels)]

    def match(self, labels: Mapping[str, str]) -> SeriesPlan:
        rs = self.rules
        hits = self.matching(labels)
        maps = [rs.mapping[i] for i in hits if i < self._nmap]
        rolls = [rs.rollup[i - self._nmap] for i in hits if i >= self._nmap]
        drop = any(m.drop for m in maps)
        by_policy: dict[StoragePolicy, tuple[set[str], list[str]]] = {}
        for m in maps:
            for p in m.policies:
                aggs, names = by_policy.setdefault(p, (set(), []))
                aggs.update(m.aggregations or (DEFAULT_AGGREGATION,))
                names.append(m.name)
        if not drop:
            for p in rs.default_policies:
                by_policy.setdefault(p, ({DEFAULT_AGGREGATION}, ["default"]))
        outputs = tuple(
            Output(p, tuple(a for a in AGGREGATIONS if a in aggs), tuple(names))
            for p, (aggs, names) in sorted(by_policy.items()))
        rollups = []
        for r in rolls:
            g = group_labels(r, labels)
            if g is not None:
                rollups.append(RollupInput(r, g, r.policies or rs.default_policies))
        return SeriesPlan(rs.version, not drop, outputs, tuple(rollups))


def group_labels(rule: RollupRule, labels: Mapping[str, str]) -> Labels | None:
    """Labels of the rolled-up series this series feeds, or None when it lacks a groupBy label
    (only series that carry every groupBy label are rolled up)."""
    op = rule.rollup
    if op.group_by is not None:
        if any(lab not in labels for lab in op.group_by):
            return None
        kept = {lab: labels[lab] for lab in op.group_by}
    else:
        drop = set(op.exclude_by or ()) | {NAME}
        kept = {k: v for k, v in labels.items() if k not in drop}
    kept[NAME] = op.metric_name
    return tuple(sorted(kept.items()))
