"""The labels a rule set reads: a series' plan depends only on its *projection* onto them.

Planning a new series (m3shm/workers/aggregate.py) matches it against every rule-set version
of the chain and lays out its cells. All of that reads only:

- the labels named by a filter term (``tag:glob``; the tag ``name`` also reads ``__name__``,
  m3shm.rules.filters), mapping and rollup rules alike: whether a term matches depends on the
  label's value and on whether the series carries it;
- a rollup's ``groupBy`` labels (the group's labels, and whether the series is rolled up at
  all: only series carrying every groupBy label are);
- with ``excludeBy``, every label but the excluded ones (the group keeps them all): such a
  rule set reads every label (:data:`ALL`).

So two series whose labels agree on those names (same values, same presence) get the same
plan, and a batch of new series is planned once per distinct projection (csrc/plangroup.c
groups them in C). :class:`Projection` is what the C side takes: ``names`` kept with their
values, and what to keep of the other labels (:data:`SKIP` nothing, :data:`NAMES` their names
only, :data:`ALL` everything). The group series of an aggregated namespace
(m3shm/workers/rollup.py) are planned from their metric name and the *set* of their label
names: :func:`group_projection`. Imports no numpy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from m3shm.rules.filters import NAME, Filter
from m3shm.rules.ruleset import RuleSet

# What to keep of a label not in Projection.names (the values of enum m3_proj_others)
SKIP = 0
NAMES = 1
ALL = 2


@dataclass(frozen=True)
class Projection:
    names: frozenset[str]
    others: int = SKIP

    def union(self, other: Projection) -> Projection:
        return Projection(self.names | other.names, max(self.others, other.others))

    def key(self, labels: dict[str, str]) -> tuple:
        """The projection of a label set in Python (equal iff csrc/plangroup.c's bytes are)."""
        if self.others == ALL:
            return tuple(sorted(labels.items()))
        return tuple(sorted((k, v if k in self.names else None) for k, v in labels.items()
                            if self.others == NAMES or k in self.names))


def _filter_names(f: Filter) -> set[str]:
    out = set()
    for t in f.terms:
        out.add(t.tag)
        if t.tag == "name":  # reads the metric name when the series has no `name` label
            out.add(NAME)
    return out


def rules_projection(rs: RuleSet) -> Projection:
    """The labels whose values decide a raw series' plan under rule set ``rs``."""
    names: set[str] = set()
    others = SKIP
    for m in rs.mapping:
        names |= _filter_names(m.filter)
    for r in rs.rollup:
        names |= _filter_names(r.filter)
        op = r.rollup
        if op.group_by is not None:
            names |= set(op.group_by)
        else:
            others = ALL  # excludeBy: the group keeps every other label
    return Projection(frozenset(names), others)


def group_projection() -> Projection:
    """What decides a group series' plan (m3shm.workers.rollup.group_cells): its metric name
    and which labels it has (exactly a rule's groupBy; none of its excludeBy)."""
    return Projection(frozenset({NAME}), NAMES)


def union(projections: Iterable[Projection]) -> Projection:
    out = Projection(frozenset())
    for p in projections:
        out = out.union(p)
    return out
