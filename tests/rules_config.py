"""Daemon configs with downsampling rules for end-to-end tests (``Daemon(tmp, extra=...)``).

``rules_config(rule, ..., default_policies=[...], admission="1s", raw={...})`` is the YAML of
``downsample: {admission, rules: {mappingRules, defaultPolicies}}`` and, with ``raw``, the raw
namespace ``default`` with those keys (short windows, so tests run in seconds). Rules are
dicts in M3's format (docs/rules.md); the seed's example stays literal in tests/test_rules.py.
"""

from __future__ import annotations

from typing import Any

import yaml


def rules_config(*mapping_rules: dict[str, Any], default_policies: list[str] | None = None,
                 admission: str | None = None, raw: dict[str, str] | None = None) -> str:
    cfg: dict[str, Any] = {}
    if raw is not None:
        cfg["namespaces"] = [{"name": "default", **raw}]
    down: dict[str, Any] = {}
    if admission is not None:
        down["admission"] = admission
    rules: dict[str, Any] = {"mappingRules": list(mapping_rules)}
    if default_policies is not None:
        rules["defaultPolicies"] = default_policies
    down["rules"] = rules
    cfg["downsample"] = down
    return "\n" + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=100)


def short_raw(retention: str, block: str, past: str, future: str) -> dict[str, str]:
    """The raw namespace's keys for ``rules_config(raw=...)``."""
    return {"retention": retention, "blockSize": block, "bufferPast": past,
            "bufferFuture": future}
