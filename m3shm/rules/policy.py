"""Storage policies: ``resolution:retention`` (``10s:2d``, ``1m:30d``, ``1h:5y``), M3's format.

A policy names the aggregated namespace its points go to (``agg_1m_30d``); that namespace's
block size follows the retention as M3 recommends it, rounded to a multiple of the resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from m3shm.config import ConfigError, parse_duration_ms


class RuleError(ConfigError):
    """A rule, filter or policy is invalid; the message names the key and what is wrong."""


_UNITS = (("y", 365 * 86_400_000), ("w", 7 * 86_400_000), ("d", 86_400_000),
          ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))


def format_duration(ms: int) -> str:
    """Prometheus-style duration text that parses back to ``ms`` (``90s`` -> ``1m30s``)."""
    if ms == 0:
        return "0s"
    out = []
    for unit, size in _UNITS:
        if unit == "w":
            continue  # 14d reads better than 2w
        if ms >= size:
            out.append(f"{ms // size}{unit}")
            ms %= size
    return "".join(out)


@dataclass(frozen=True, order=True)
class StoragePolicy:
    resolution_ms: int
    retention_ms: int

    def __str__(self) -> str:
        return f"{format_duration(self.resolution_ms)}:{format_duration(self.retention_ms)}"

    @property
    def namespace(self) -> str:
        """Name of the aggregated namespace that holds this policy's points."""
        return f"agg_{format_duration(self.resolution_ms)}_{format_duration(self.retention_ms)}"

    @property
    def block_size_ms(self) -> int:
        """Block size suited to the retention (M3's table), a multiple of the resolution."""
        day = 86_400_000
        ret = self.retention_ms
        block = (2 * 3_600_000 if ret <= 2 * day else 4 * 3_600_000 if ret <= 7 * day
                 else 12 * 3_600_000 if ret <= 30 * day else day)
        if block % self.resolution_ms:
            block = -(-block // self.resolution_ms) * self.resolution_ms
        return block


def parse_policy(raw: Any, key: str) -> StoragePolicy:
    """``"1m:30d"`` or ``{resolution: 1m, retention: 30d}`` (M3 accepts both spellings)."""
    if isinstance(raw, dict):
        unknown = set(raw) - {"resolution", "retention"}
        if unknown:
            raise RuleError(f"{key}: unknown key {sorted(unknown)[0]!r} (a storage policy has "
                            f"resolution and retention)")
        if "resolution" not in raw or "retention" not in raw:
            raise RuleError(f"{key}: a storage policy needs both resolution and retention, "
                            f"got {raw!r}")
        res_raw, ret_raw = raw["resolution"], raw["retention"]
    elif isinstance(raw, str) and raw.count(":") == 1:
        res_raw, ret_raw = (p.strip() for p in raw.split(":"))
    else:
        raise RuleError(f"{key}: expected a storage policy like 1m:30d or {{resolution: 1m, "
                        f"retention: 30d}}, got {raw!r}")
    if isinstance(res_raw, int | float) or isinstance(ret_raw, int | float):
        raise RuleError(f"{key}: durations need a unit (10s, 1m, 30d), got {raw!r}")
    try:
        res = parse_duration_ms(res_raw, f"{key}.resolution")
        ret = parse_duration_ms(ret_raw, f"{key}.retention")
    except ConfigError as e:
        raise RuleError(str(e)) from None
    if res < 1000:
        raise RuleError(f"{key}.resolution: must be at least 1s, got {res_raw!r}")
    if ret < res:
        raise RuleError(f"{key}.retention: must be at least the resolution ({res_raw}), got "
                        f"{ret_raw!r}")
    if ret % res:
        raise RuleError(f"{key}: retention {ret_raw} must be a multiple of resolution "
                        f"{res_raw}")
    return StoragePolicy(res, ret)


def parse_policies(raw: Any, key: str) -> tuple[StoragePolicy, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RuleError(f"{key}: expected a list of storage policies, got {raw!r}")
    out = [parse_policy(p, f"{key}[{i}]") for i, p in enumerate(raw)]
    for i, p in enumerate(out):
        if p in out[:i]:
            raise RuleError(f"{key}[{i}]: storage policy {p} is listed twice")
    return tuple(out)
