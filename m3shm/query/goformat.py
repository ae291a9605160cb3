"""Go's formatting and template rules where PromQL exposes them to users."""

from __future__ import annotations

import math
import re

import numpy as np


def format_float(v: float) -> str:
    """strconv.FormatFloat(v, 'f', -1, 64): shortest round-trip digits, never an exponent."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return np.format_float_positional(v, unique=True, trim="-")


_TEMPLATE = re.compile(r"\$(?:\$|\{([A-Za-z0-9_]*)\}|([A-Za-z0-9_]+))")


def expand(template: str, match: re.Match[str]) -> str:
    """regexp.Expand: ``$1``, ``${1}``, ``$name``, ``${name}``, ``$$``; unknown groups are
    empty, and ``$1x`` names the group "1x" (Go takes the longest name)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) if m.group(1) is not None else m.group(2)
        if name.isdigit():
            i = int(name)
            if i <= (match.re.groups or 0):
                return match.group(i) or ""
            return ""
        try:
            return match.group(name) or ""
        except IndexError:
            return ""

    return _TEMPLATE.sub(sub, template)
