"""M3 tag filters: space-separated ``tag:glob`` terms, all of which must match.

``__name__:disk_used* device:sd*`` matches a series whose metric name starts with
``disk_used`` and whose ``device`` label starts with ``sd``. Globs, as M3 has them:

- ``*`` any run of characters, ``?`` one character;
- ``[abc]`` one of the characters, ``[a-z0-9]`` ranges, ``[!a-z]`` none of them;
- ``{a,bc}`` one of the alternatives (plain text, no nesting);
- a leading ``!`` negates the whole pattern (``device:!sd*``).

Like M3: a term on a label the series does not carry never matches (negated or not), a tag
may appear once per filter, and an empty filter matches every series. Where M3 is narrower
(at most two ``*``, ranges and plain characters not mixed inside one ``[]``), this is a
superset that agrees with M3 on every pattern M3 accepts. The tag ``name`` also reads the
metric name when a series has no ``name`` label (the seed's ``name:disk_used*`` spelling).
A term splits at its first ``:`` (label names cannot hold one; values may).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from m3shm.rules.policy import RuleError

NAME = "__name__"
LABEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_META = set("*?[]{}")


def _glob_error(key: str, pattern: str, pos: int, what: str) -> RuleError:
    return RuleError(f"{key}: pattern {pattern!r}: {what} at position {pos}")


def glob_to_regex(pattern: str, key: str) -> str:
    """The anchored regular expression of an M3 glob (without the leading ``!``)."""
    out = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                raise _glob_error(key, pattern, i, "'[' is never closed")
            body = pattern[i + 1 : j]
            neg = body.startswith("!")
            if neg:
                body = body[1:]
            if not body:
                raise _glob_error(key, pattern, i, "empty character set '[]'")
            parts = []
            k = 0
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    lo, hi = body[k], body[k + 2]
                    if lo > hi:
                        raise _glob_error(key, pattern, i + 1 + k,
                                          f"range {lo}-{hi} runs backwards")
                    parts.append(f"{re.escape(lo)}-{re.escape(hi)}")
                    k += 3
                else:
                    parts.append(re.escape(body[k]))
                    k += 1
            out.append(("[^" if neg else "[") + "".join(parts) + "]")
            i = j
        elif ch == "{":
            j = pattern.find("}", i + 1)
            if j < 0:
                raise _glob_error(key, pattern, i, "'{' is never closed")
            body = pattern[i + 1 : j]
            if not body:
                raise _glob_error(key, pattern, i, "empty alternatives '{}'")
            if _META & set(body):
                raise _glob_error(key, pattern, i, "alternatives in '{}' are plain text "
                                  "(no *, ?, [, { inside)")
            out.append("(?:" + "|".join(re.escape(a) for a in body.split(",")) + ")")
            i = j
        elif ch in "]}":
            raise _glob_error(key, pattern, i, f"unmatched {ch!r}")
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class TagFilter:
    tag: str
    pattern: str                     # as written, with any leading '!'
    negate: bool
    regex: re.Pattern[str] = field(compare=False, repr=False)
    literal: str | None = None       # the pattern when it has no glob characters
    prefix: str | None = None        # the text before a single trailing '*'

    def matches_value(self, value: str) -> bool:
        if self.literal is not None:
            hit = value == self.literal
        elif self.prefix is not None:
            hit = value.startswith(self.prefix)
        else:
            hit = self.regex.fullmatch(value) is not None
        return hit != self.negate


def parse_term(term: str, key: str) -> TagFilter:
    tag, sep, pattern = term.partition(":")
    if not sep:
        raise RuleError(f"{key}: term {term!r} is not tag:pattern")
    if not tag:
        raise RuleError(f"{key}: term {term!r} has an empty tag name")
    if not LABEL_RE.match(tag):
        raise RuleError(f"{key}: term {term!r}: {tag!r} is not a valid label name")
    if not pattern:
        raise RuleError(f"{key}: term {term!r} has an empty pattern")
    negate = pattern.startswith("!")
    body = pattern[1:] if negate else pattern
    if negate and not body:
        raise RuleError(f"{key}: term {term!r}: '!' needs a pattern to negate")
    where = f"{key}: term {term!r}"
    rx = re.compile(glob_to_regex(body, where), re.DOTALL)
    literal = body if not (_META & set(body)) else None
    prefix = (body[:-1] if body.endswith("*") and not (_META & set(body[:-1])) else None)
    return TagFilter(tag, pattern, negate, rx, literal, prefix)


@dataclass(frozen=True)
class Filter:
    """A parsed filter: its text (as written) and its terms, sorted by tag."""

    text: str
    terms: tuple[TagFilter, ...]

    def term(self, tag: str) -> TagFilter | None:
        return next((t for t in self.terms if t.tag == tag), None)

    def matches(self, labels: Mapping[str, str]) -> bool:
        for t in self.terms:
            v = labels.get(t.tag)
            if v is None and t.tag == "name":
                v = labels.get(NAME)
            if v is None or not t.matches_value(v):
                return False
        return True


def parse_filter(text: object, key: str) -> Filter:
    if not isinstance(text, str):
        raise RuleError(f"{key}: expected a filter string like '__name__:http_* job:api', got "
                        f"{text!r}")
    terms: dict[str, TagFilter] = {}
    for raw in text.split():
        t = parse_term(raw, key)
        if t.tag in terms:
            raise RuleError(f"{key}: tag {t.tag!r} appears twice in {text!r}")
        terms[t.tag] = t
    return Filter(text, tuple(sorted(terms.values(), key=lambda t: t.tag)))
