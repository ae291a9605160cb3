"""A rule set: M3's ``downsample: {rules: {mappingRules: [...], rollupRules: [...]}}``.

Parsing validates everything once and names the key that is wrong
(``downsample.rules.rollupRules[0].transforms[1].rollup.groupBy: ...``). A rule set is
versioned (every replacement takes the next version; m3shm/rules/versions.py keeps them in the
data directory) and round-trips through a plain dict, so it serialises to YAML or JSON for
``<data>/rules.json`` and for ``GET/PUT /api/v1/rules``.
Semantics (defaults, drop, pipelines): docs/rules.md.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

from m3shm.rules.filters import LABEL_RE, Filter, parse_filter
from m3shm.rules.policy import RuleError, StoragePolicy, parse_policies

# Aggregation names as M3 spells them (enum m3_agg_type in csrc/m3shm.h holds their codes).
AGGREGATIONS = ("Last", "Min", "Max", "Mean", "Median", "Count", "Sum", "SumSq", "Stdev",
                "P10", "P20", "P30", "P40", "P50", "P60", "P70", "P80", "P90", "P95", "P99",
                "P999", "P9999")
TRANSFORMS = ("Increase", "PerSecond", "Add", "Absolute")
DEFAULT_AGGREGATION = "Last"
# The embedded default: raw data for 2 days (the unaggregated namespace's retention) and every
# series at 1 minute for 30 days, aggregated with Last.
DEFAULT_POLICIES = (StoragePolicy(60_000, 30 * 86_400_000),)

METRIC_RE = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_AGG_BY_LOWER = {a.lower(): a for a in AGGREGATIONS}
_XF_BY_LOWER = {t.lower(): t for t in TRANSFORMS}


def _aggregation(raw: Any, key: str) -> str:
    if isinstance(raw, str) and raw.lower() in _AGG_BY_LOWER:
        return _AGG_BY_LOWER[raw.lower()]
    raise RuleError(f"{key}: unknown aggregation {raw!r} (one of {', '.join(AGGREGATIONS)})")


def _aggregations(raw: Any, key: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RuleError(f"{key}: expected a list of aggregations like [Max, P99], got {raw!r}")
    out = [_aggregation(a, f"{key}[{i}]") for i, a in enumerate(raw)]
    for i, a in enumerate(out):
        if a in out[:i]:
            raise RuleError(f"{key}[{i}]: aggregation {a} is listed twice")
    return tuple(out)


def _mapping(raw: Any, key: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise RuleError(f"{key}: expected a mapping, got {raw!r}")
    return raw


def _check_keys(raw: dict[str, Any], known: tuple[str, ...], key: str) -> None:
    for k in raw:
        if k not in known:
            raise RuleError(f"{key}.{k}: unknown key (known: {', '.join(known)})")


def _name(raw: dict[str, Any], key: str, default: str) -> str:
    name = raw.get("name", default)
    if not isinstance(name, str) or not name.strip():
        raise RuleError(f"{key}.name: expected a non-empty string, got {name!r}")
    return name


@dataclass(frozen=True)
class MappingRule:
    name: str
    filter: Filter
    aggregations: tuple[str, ...] = ()           # () = the default, Last
    policies: tuple[StoragePolicy, ...] = ()
    drop: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "filter": self.filter.text}
        if self.aggregations:
            d["aggregations"] = list(self.aggregations)
        if self.policies:
            d["storagePolicies"] = [str(p) for p in self.policies]
        if self.drop:
            d["drop"] = True
        return d


_MAPPING_KEYS = ("name", "filter", "aggregations", "storagePolicies", "policies", "drop")


def parse_mapping_rule(raw: Any, key: str, index: int) -> MappingRule:
    raw = _mapping(raw, key)
    _check_keys(raw, _MAPPING_KEYS, key)
    if "filter" not in raw:
        raise RuleError(f"{key}.filter: every mapping rule needs a filter")
    if "storagePolicies" in raw and "policies" in raw:
        raise RuleError(f"{key}: give storagePolicies or policies (the seed's spelling), not "
                        f"both")
    pkey = "policies" if "policies" in raw else "storagePolicies"
    policies = parse_policies(raw.get(pkey), f"{key}.{pkey}")
    aggs = _aggregations(raw.get("aggregations"), f"{key}.aggregations")
    drop = raw.get("drop", False)
    if not isinstance(drop, bool):
        raise RuleError(f"{key}.drop: expected true or false, got {drop!r}")
    if drop and (policies or aggs):
        raise RuleError(f"{key}.drop: a drop rule keeps nothing, so it takes no "
                        f"storagePolicies or aggregations")
    if not drop and not policies:
        raise RuleError(f"{key}.storagePolicies: a mapping rule needs at least one storage "
                        f"policy (or drop: true)")
    return MappingRule(_name(raw, key, f"mapping-{index}"),
                       parse_filter(raw["filter"], f"{key}.filter"), aggs, policies, drop)


@dataclass(frozen=True)
class PipelineOp:
    """One step of a rollup pipeline: kind is aggregate, transform or rollup."""

    kind: str
    type: str = ""                                # aggregate / transform
    metric_name: str = ""                         # rollup
    group_by: tuple[str, ...] | None = None       # rollup: keep only these labels
    exclude_by: tuple[str, ...] | None = None     # rollup: keep all but these labels
    aggregations: tuple[str, ...] = ()            # rollup

    def to_dict(self) -> dict[str, Any]:
        if self.kind != "rollup":
            return {self.kind: {"type": self.type}}
        r: dict[str, Any] = {"metricName": self.metric_name}
        if self.group_by is not None:
            r["groupBy"] = list(self.group_by)
        if self.exclude_by is not None:
            r["excludeBy"] = list(self.exclude_by)
        if self.aggregations:
            r["aggregations"] = list(self.aggregations)
        return {"rollup": r}


def _labels(raw: Any, key: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise RuleError(f"{key}: expected a list of label names, got {raw!r}")
    for i, lab in enumerate(raw):
        if not LABEL_RE.match(lab):
            raise RuleError(f"{key}[{i}]: {lab!r} is not a valid label name")
        if lab in raw[:i]:
            raise RuleError(f"{key}[{i}]: label {lab!r} is listed twice")
        if lab == "__name__":
            raise RuleError(f"{key}[{i}]: __name__ is set by metricName")
    return tuple(raw)


def parse_op(raw: Any, key: str) -> PipelineOp:
    raw = _mapping(raw, key)
    kinds = [k for k in ("transform", "aggregate", "rollup") if k in raw]
    _check_keys(raw, ("transform", "aggregate", "rollup"), key)
    if len(kinds) != 1:
        raise RuleError(f"{key}: each step has exactly one of transform, aggregate, rollup; "
                        f"got {sorted(raw)}")
    kind = kinds[0]
    body = _mapping(raw[kind], f"{key}.{kind}")
    if kind in ("transform", "aggregate"):
        _check_keys(body, ("type",), f"{key}.{kind}")
        t = body.get("type")
        if kind == "aggregate":
            return PipelineOp(kind, _aggregation(t, f"{key}.aggregate.type"))
        if not isinstance(t, str) or t.lower() not in _XF_BY_LOWER:
            raise RuleError(f"{key}.transform.type: unknown transform {t!r} (one of "
                            f"{', '.join(TRANSFORMS)})")
        return PipelineOp(kind, _XF_BY_LOWER[t.lower()])
    k = f"{key}.rollup"
    _check_keys(body, ("metricName", "groupBy", "excludeBy", "aggregations"), k)
    name = body.get("metricName")
    if not isinstance(name, str) or not METRIC_RE.fullmatch(name):
        raise RuleError(f"{k}.metricName: expected a metric name like http_requests:sum, got "
                        f"{name!r}")
    if ("groupBy" in body) == ("excludeBy" in body):
        raise RuleError(f"{k}: give exactly one of groupBy and excludeBy")
    gb = _labels(body["groupBy"], f"{k}.groupBy") if "groupBy" in body else None
    eb = _labels(body["excludeBy"], f"{k}.excludeBy") if "excludeBy" in body else None
    aggs = _aggregations(body.get("aggregations"), f"{k}.aggregations") or ("Sum",)
    return PipelineOp("rollup", metric_name=name, group_by=gb, exclude_by=eb, aggregations=aggs)


@dataclass(frozen=True)
class RollupRule:
    name: str
    filter: Filter
    pipeline: tuple[PipelineOp, ...]
    policies: tuple[StoragePolicy, ...] = ()     # () = the default policies

    @property
    def rollup(self) -> PipelineOp:
        return next(op for op in self.pipeline if op.kind == "rollup")

    @property
    def first_aggregation(self) -> str | None:
        return self.pipeline[0].type if self.pipeline[0].kind == "aggregate" else None

    def transforms(self, after_rollup: bool) -> tuple[str, ...]:
        i = next(i for i, op in enumerate(self.pipeline) if op.kind == "rollup")
        ops = self.pipeline[i + 1:] if after_rollup else self.pipeline[:i]
        return tuple(op.type for op in ops if op.kind == "transform")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "filter": self.filter.text,
                             "transforms": [op.to_dict() for op in self.pipeline]}
        if self.policies:
            d["storagePolicies"] = [str(p) for p in self.policies]
        return d


def parse_rollup_rule(raw: Any, key: str, index: int) -> RollupRule:
    raw = _mapping(raw, key)
    _check_keys(raw, ("name", "filter", "transforms", "storagePolicies", "policies"), key)
    if "filter" not in raw:
        raise RuleError(f"{key}.filter: every rollup rule needs a filter")
    if "storagePolicies" in raw and "policies" in raw:
        raise RuleError(f"{key}: give storagePolicies or policies, not both")
    pkey = "policies" if "policies" in raw else "storagePolicies"
    ops_raw = raw.get("transforms")
    if not isinstance(ops_raw, list) or not ops_raw:
        raise RuleError(f"{key}.transforms: expected a non-empty list of steps (transform, "
                        f"aggregate, rollup)")
    ops = tuple(parse_op(o, f"{key}.transforms[{i}]") for i, o in enumerate(ops_raw))
    kinds = [op.kind for op in ops]
    if kinds.count("rollup") != 1:
        raise RuleError(f"{key}.transforms: needs exactly one rollup step (one rollup level), "
                        f"found {kinds.count('rollup')}")
    if kinds.count("aggregate") > 1 or ("aggregate" in kinds and kinds[0] != "aggregate"):
        raise RuleError(f"{key}.transforms: at most one aggregate step, and only as the first "
                        f"step")
    r = kinds.index("rollup")
    before = [op.type for op in ops[:r] if op.kind == "transform"]
    after = [op.type for op in ops[r + 1:]]
    for side, lst in (("before", before), ("after", after)):
        if len(lst) > 4:
            raise RuleError(f"{key}.transforms: at most 4 transforms {side} the rollup")
    if "PerSecond" in before[:-1] and kinds[0] != "aggregate":
        raise RuleError(f"{key}.transforms: PerSecond before the rollup must be the last "
                        f"transform before it")
    if after and len(ops[r].aggregations) != 1:
        raise RuleError(f"{key}.transforms[{r}].rollup.aggregations: transforms after the "
                        f"rollup need exactly one aggregation")
    policies = parse_policies(raw.get(pkey), f"{key}.{pkey}")
    return RollupRule(_name(raw, key, f"rollup-{index}"),
                      parse_filter(raw["filter"], f"{key}.filter"), ops, policies)


@dataclass(frozen=True)
class RuleSet:
    mapping: tuple[MappingRule, ...] = ()
    rollup: tuple[RollupRule, ...] = ()
    version: int = 1
    updated_ms: int = 0
    default_policies: tuple[StoragePolicy, ...] = field(default=DEFAULT_POLICIES)

    def to_dict(self) -> dict[str, Any]:
        """M3's shape: ``{mappingRules: [...], rollupRules: [...]}`` (plus our defaults)."""
        return {"mappingRules": [r.to_dict() for r in self.mapping],
                "rollupRules": [r.to_dict() for r in self.rollup],
                "defaultPolicies": [str(p) for p in self.default_policies]}

    def policies(self) -> tuple[StoragePolicy, ...]:
        """Every storage policy the rules can write to (one aggregated namespace each)."""
        ps = set(self.default_policies)
        for m in self.mapping:
            ps.update(m.policies)
        for r in self.rollup:
            ps.update(r.policies or self.default_policies)
        return tuple(sorted(ps))

    def successor(self, new: RuleSet) -> RuleSet:
        """``new`` as the next version of this rule set."""
        return replace(new, version=self.version + 1, updated_ms=int(time.time() * 1000))


def parse_rules(raw: Any, key: str = "downsample.rules") -> RuleSet:
    """Parse ``{mappingRules: [...], rollupRules: [...], defaultPolicies: [...]}``."""
    if raw is None:
        return RuleSet()
    raw = _mapping(raw, key)
    _check_keys(raw, ("mappingRules", "rollupRules", "defaultPolicies"), key)
    out = {}
    for k, fn in (("mappingRules", parse_mapping_rule), ("rollupRules", parse_rollup_rule)):
        lst = raw.get(k) or []
        if not isinstance(lst, list):
            raise RuleError(f"{key}.{k}: expected a list, got {lst!r}")
        out[k] = tuple(fn(r, f"{key}.{k}[{i}]", i) for i, r in enumerate(lst))
    names = [r.name for r in out["mappingRules"] + out["rollupRules"]]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise RuleError(f"{key}: rule name {n!r} is used twice")
    defaults = DEFAULT_POLICIES
    if "defaultPolicies" in raw:
        defaults = parse_policies(raw["defaultPolicies"], f"{key}.defaultPolicies")
    return RuleSet(out["mappingRules"], out["rollupRules"], default_policies=defaults)


def parse_yaml(text: str, key: str = "rules") -> RuleSet:
    """Rules from YAML: either the rules mapping itself or a config with downsample.rules."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RuleError(f"{key}: not valid YAML: {e}") from None
    if isinstance(doc, dict) and "downsample" in doc:
        ds = _mapping(doc["downsample"], "downsample")
        return parse_rules(ds.get("rules"), "downsample.rules")
    return parse_rules(doc, key)

