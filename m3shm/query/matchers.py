"""Label matchers (=, !=, =~, !~) with Prometheus' rules.

Regular expressions are fully anchored, as RE2 in Prometheus compiles ``^(?:re)$``; Python's
``re`` agrees with RE2 on the syntax PromQL users write. A label a series lacks matches as the
empty string, so ``{a=""}`` selects series without ``a``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from m3shm.query.errors import QueryError
from m3shm.query.labels import METRIC_NAME, Labels, get

OPS = ("=", "!=", "=~", "!~")

_PARSER_OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~",
               "MatchOp.NotRe": "!~"}


@lru_cache(maxsize=4096)
def compile_anchored(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(f"(?:{pattern})")
    except re.error as e:
        raise QueryError(f"invalid regular expression {pattern!r}: {e}") from None


@dataclass(frozen=True)
class Matcher:
    name: str
    op: str
    value: str
    _re: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise QueryError(f"unknown matcher operator {self.op!r}")
        if self.op in ("=~", "!~"):
            object.__setattr__(self, "_re", compile_anchored(self.value))

    def matches(self, value: str) -> bool:
        if self.op == "=":
            return value == self.value
        if self.op == "!=":
            return value != self.value
        assert self._re is not None
        hit = self._re.fullmatch(value) is not None
        return hit if self.op == "=~" else not hit

    def __str__(self) -> str:
        return f'{self.name}{self.op}"{self.value}"'


def matches_all(matchers: list[Matcher], labels: Labels) -> bool:
    return all(m.matches(get(labels, m.name)) for m in matchers)


def from_selector(vs: Any) -> list[Matcher]:
    """The matchers of a promql_parser VectorSelector, the metric name first."""
    out: list[Matcher] = []
    if vs.name:
        out.append(Matcher(METRIC_NAME, "=", vs.name))
    for m in vs.matchers.matchers:
        out.append(Matcher(m.name, _PARSER_OPS[str(m.op)], m.value))
    if vs.matchers.or_matchers:
        raise QueryError("'or' inside a label selector is not PromQL of Prometheus 2.x")
    return out
