"""Label sets as the engine holds them: sorted tuples of (name, value) pairs.

A label set is hashable (series are grouped and matched through dicts keyed by label sets) and
never holds an empty value: an empty value means the label is absent, as in Prometheus.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

Labels = tuple[tuple[str, str], ...]

METRIC_NAME = "__name__"
EMPTY: Labels = ()


def from_pairs(pairs: Iterable[tuple[str, str]]) -> Labels:
    """A label set from (name, value) pairs; empty values are dropped, the last name wins."""
    out: dict[str, str] = {}
    for name, value in pairs:
        out[name] = value
    return tuple(sorted((k, v) for k, v in out.items() if v != ""))


def from_dict(d: Mapping[str, str]) -> Labels:
    return from_pairs(d.items())


def get(labels: Labels, name: str) -> str:
    """The value of ``name`` ("" when absent)."""
    for k, v in labels:
        if k == name:
            return v
    return ""


def drop_name(labels: Labels) -> Labels:
    if labels and labels[0][0] == METRIC_NAME:
        return labels[1:]
    return tuple(p for p in labels if p[0] != METRIC_NAME)


def keep(labels: Labels, names: frozenset[str]) -> Labels:
    return tuple(p for p in labels if p[0] in names)


def drop(labels: Labels, names: frozenset[str]) -> Labels:
    return tuple(p for p in labels if p[0] not in names)


def with_label(labels: Labels, name: str, value: str) -> Labels:
    """``labels`` with ``name`` set to ``value`` (removed when ``value`` is empty)."""
    d = dict(labels)
    d[name] = value
    return from_dict(d)


def format_labels(labels: Labels) -> str:
    """Prometheus' text form: ``name{a="1", b="2"}``."""
    name = get(labels, METRIC_NAME)
    inner = ", ".join(f'{k}="{_escape(v)}"' for k, v in labels if k != METRIC_NAME)
    if name and not inner:
        return name
    return f"{name}{{{inner}}}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def is_valid_name(name: str) -> bool:
    """A valid label name: [a-zA-Z_][a-zA-Z0-9_]*."""
    if not name or not (name[0].isascii() and (name[0].isalpha() or name[0] == "_")):
        return False
    return all(c.isascii() and (c.isalnum() or c == "_") for c in name)
