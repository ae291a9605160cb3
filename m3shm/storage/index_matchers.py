"""Label matchers as the reverse index takes them, and the plan for running a regex over values.

Semantics are those of :mod:`m3shm.query.matchers` (and Prometheus): ``=``, ``!=``, ``=~``, ``!~``;
regexes are fully anchored (``fullmatch`` of ``(?:re)``); a series lacking a label matches as if
its value were the empty string. Any object with ``name``, ``op`` and ``value`` attributes (the
engine's ``Matcher``) or a ``(name, op, value)`` tuple is accepted.

A regex is never run against series, only against a label's distinct values, and often not even
that: :func:`plan_regex` recognises literal alternations (``a|b|c``, answered by lookups) and a
literal prefix (``host-1.*``, answered by a binary search over the sorted values; the regex then
runs only over the values in the prefix's range, or not at all when the rest is ``.*``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

OPS = ("=", "!=", "=~", "!~")
_SPECIAL = set("\\.^$*+?{}[]|()")
_QUANTIFIERS = set("*+?{")


@dataclass(frozen=True)
class RegexPlan:
    """How to find the values a regex matches: a literal set, or a prefix range (+ the regex)."""

    literals: frozenset[str] | None  # the pattern is exactly this alternation of literals
    prefix: str  # every match starts with this ("" when unknown)
    dot_star_rest: bool  # the pattern is exactly ``re.escape(prefix) + ".*"``


@dataclass(frozen=True)
class IndexMatcher:
    name: str
    op: str
    value: str
    regex: re.Pattern[str] | None
    plan: RegexPlan | None

    @property
    def negated(self) -> bool:
        return self.op in ("!=", "!~")

    def base_matches(self, value: str) -> bool:
        """The predicate before negation: equality for ``=``/``!=``, the regex for the others."""
        if self.regex is None:
            return value == self.value
        return self.regex.fullmatch(value) is not None

    def matches(self, value: str) -> bool:
        return self.base_matches(value) != self.negated

    @property
    def matches_empty(self) -> bool:
        return self.matches("")

    def __str__(self) -> str:
        return f'{self.name}{self.op}"{self.value}"'


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(f"(?:{pattern})")
    except re.error as e:
        raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None


def _literal_chars(pattern: str) -> tuple[list[str], int]:
    """The literal characters at the start of ``pattern`` and the raw index where they stop.

    A backslash followed by punctuation is that literal character; anything else special ends
    the run.
    """
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 < len(pattern) and not pattern[i + 1].isalnum() and pattern[i + 1] != "_":
                out.append(pattern[i + 1])
                i += 2
                continue
            break
        if c in _SPECIAL:
            break
        out.append(c)
        i += 1
    return out, i


def _split_top_alternation(pattern: str) -> list[str] | None:
    """``pattern`` split at ``|``, if every part is a plain literal; else None."""
    parts: list[str] = []
    for raw in pattern.split("|"):
        chars, stop = _literal_chars(raw)
        if stop != len(raw):
            return None
        parts.append("".join(chars))
    # a trailing backslash before "|" would have escaped it; _literal_chars rejected that above
    return parts


@lru_cache(maxsize=4096)
def plan_regex(pattern: str) -> RegexPlan:
    parts = _split_top_alternation(pattern)
    if parts is not None:
        return RegexPlan(frozenset(parts), "", False)
    if "|" in pattern:  # an alternation somewhere: no common prefix is known
        return RegexPlan(None, "", False)
    chars, stop = _literal_chars(pattern)
    if stop < len(pattern) and pattern[stop] in _QUANTIFIERS and chars:
        chars.pop()  # the last literal is quantified, so it may be absent or repeated
        return RegexPlan(None, "".join(chars), False)
    return RegexPlan(None, "".join(chars), pattern[stop:] == ".*")


def to_index_matcher(m: Any) -> IndexMatcher:
    """An :class:`IndexMatcher` from an engine matcher, an IndexMatcher or a 3-tuple."""
    if isinstance(m, IndexMatcher):
        return m
    if isinstance(m, tuple):
        name, op, value = m
    else:
        name, op, value = m.name, m.op, m.value
    if op not in OPS:
        raise ValueError(f"unknown matcher operator {op!r} in {name}{op}{value!r}")
    if op in ("=~", "!~"):
        return IndexMatcher(name, op, value, _compile(value), plan_regex(value))
    return IndexMatcher(name, op, value, None, None)
