"""Rule parsing and validation (M3's format), tag filters, matching plans, persistence."""

from __future__ import annotations

import fnmatch
import json
import re

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from m3shm import config
from m3shm.config import ConfigError
from m3shm.rules.cells import ring_windows, rollup_group_cell, rollup_series_cell
from m3shm.rules.filters import parse_filter
from m3shm.rules.matcher import CompiledRules, output_labels
from m3shm.rules.policy import RuleError, StoragePolicy, parse_policy
from m3shm.rules.ruleset import parse_rules, parse_yaml

# The seed's mapping rule as the seed writes it (the translation's typographic dashes are
# list dashes in the original post): `name:` filter, `policies` of resolution/retention.
SEED = """
downsample:
  rules:
    mappingRules:
     - name: Retain all disk_used metrics
       filter: name:disk_used* device:sd*
       policies:
         - resolution: 10s
           retention:  2d
         - resolution: 1m
           retention:  30d
         - resolution: 1h
           retention:  5y
"""

# M3 coordinator's documented shape: storagePolicies, a counter rollup.
M3_STYLE = """
mappingRules:
  - name: mysql metrics
    filter: "__name__:mysql_* app:{shop,cart}"
    aggregations: ["Max", "P99"]
    storagePolicies:
      - resolution: 1m
        retention: 48h
  - name: drop debug series
    filter: "__name__:*_debug_*"
    drop: true
rollupRules:
  - name: http requests by service and endpoint
    filter: "__name__:http_requests_total"
    transforms:
      - transform:
          type: "Increase"
      - rollup:
          metricName: "http_requests_by_endpoint_total"
          groupBy: ["service", "endpoint"]
          aggregations: ["Sum"]
      - transform:
          type: "Add"
    storagePolicies:
      - 10s:2d
      - 1h:5y
"""

P10S2D, P1M30D, P1H5Y = (StoragePolicy(10_000, 2 * 86_400_000),
                         StoragePolicy(60_000, 30 * 86_400_000),
                         StoragePolicy(3_600_000, 5 * 365 * 86_400_000))


def test_the_seed_example_parses_as_written_and_matches_disk_used_on_sd_devices(tmp_path
                                                                                ) -> None:
    rs = parse_yaml(SEED)
    (rule,) = rs.mapping
    assert rule.name == "Retain all disk_used metrics"
    assert rule.policies == (P10S2D, P1M30D, P1H5Y)
    cr = CompiledRules(rs)
    plan = cr.match({"__name__": "disk_used_bytes", "device": "sda1", "host": "a"})
    assert plan.store_raw
    assert [(str(o.policy), o.aggregations) for o in plan.outputs] == [
        ("10s:2d", ("Last",)), ("1m:30d", ("Last",)), ("1h:5y", ("Last",))]
    assert plan.outputs[1].rules == ("Retain all disk_used metrics",)
    # other devices and other metrics get the default policy only
    for labels in ({"__name__": "disk_used_bytes", "device": "nvme0n1"},
                   {"__name__": "disk_free_bytes", "device": "sda"},
                   {"__name__": "disk_used_bytes"}):
        assert [str(o.policy) for o in cr.match(labels).outputs] == ["1m:30d"], labels
    # and the daemon's config loader takes the same text
    path = tmp_path / "m3shm.yaml"
    path.write_text(SEED)
    assert config.load(str(path)).downsample.rule_set() == rs


def test_m3_style_rules_and_the_counter_rollup_plan() -> None:
    rs = parse_yaml(M3_STYLE)
    cr = CompiledRules(rs)
    mysql = cr.match({"__name__": "mysql_queries", "app": "cart"})
    assert [(str(o.policy), o.aggregations) for o in mysql.outputs] == [
        ("1m:2d", ("Max", "P99")), ("1m:30d", ("Last",))]
    assert cr.match({"__name__": "mysql_queries", "app": "web"}).outputs[0].policy == P1M30D
    dropped = cr.match({"__name__": "go_debug_gc", "job": "x"})
    assert not dropped.store_raw and dropped.outputs == ()
    inst = {"__name__": "http_requests_total", "service": "api", "endpoint": "/a",
            "instance": "10.0.0.1:80", "code": "200"}
    (roll,) = cr.match(inst).rollups
    assert roll.group == (("__name__", "http_requests_by_endpoint_total"), ("endpoint", "/a"),
                          ("service", "api"))
    assert roll.policies == (P10S2D, P1H5Y)
    # only series that carry every groupBy label are rolled up
    assert cr.match({"__name__": "http_requests_total", "service": "api"}).rollups == ()
    s = rollup_series_cell(roll, P10S2D, admission_ms=60_000, future_ms=120_000)
    g = rollup_group_cell(roll, P10S2D, 60_000, 5_000, 120_000)
    assert (s.pre, s.aggregations, s.post) == (("Increase",), ("Sum",), ())
    assert (g.aggregations, g.post, g.admission_ms) == (("Sum",), ("Add",), 65_000)
    assert s.nwin == ring_windows(P10S2D, 60_000, 120_000) == 19


def test_exclude_by_and_aggregate_first_pipelines() -> None:
    rs = parse_rules({"rollupRules": [{
        "name": "mem", "filter": "__name__:mem_bytes",
        "transforms": [{"aggregate": {"type": "Max"}}, {"transform": {"type": "Absolute"}},
                       {"rollup": {"metricName": "mem_bytes:max", "excludeBy": ["pod"],
                                   "aggregations": ["Max", "P90"]}}]}]})
    (roll,) = CompiledRules(rs).match({"__name__": "mem_bytes", "pod": "p1", "ns": "a"}).rollups
    assert roll.group == (("__name__", "mem_bytes:max"), ("ns", "a"))
    s = rollup_series_cell(roll, P1M30D, 0, 0)
    assert (s.aggregations, s.pre, s.post) == (("Max",), (), ("Absolute",))
    assert roll.policies == (P1M30D,)  # the default policies when the rule names none


BAD = [
    ({"mappingRules": [{"filter": "a:b"}]}, "mappingRules[0].storagePolicies: a mapping rule "
     "needs at least one"),
    ({"mappingRules": [{"filter": "a:b", "storagePolicies": ["1m"]}]},
     "mappingRules[0].storagePolicies[0]: expected a storage policy like 1m:30d"),
    ({"mappingRules": [{"filter": "a:b", "storagePolicies": ["1m:30x"]}]},
     "storagePolicies[0].retention: expected a duration"),
    ({"mappingRules": [{"filter": "a:b", "storagePolicies": ["1h:1m"]}]},
     "retention: must be at least the resolution"),
    ({"mappingRules": [{"filter": "a:b", "storagePolicies": ["1m:30d"],
                        "aggregations": ["P42"]}]}, "aggregations[0]: unknown aggregation 'P42'"),
    ({"mappingRules": [{"filter": "dev:sd[", "storagePolicies": ["1m:30d"]}]},
     "mappingRules[0].filter: term 'dev:sd[': pattern 'sd[': '[' is never closed at position 2"),
    ({"mappingRules": [{"filter": "dev:sd[z-a]", "storagePolicies": ["1m:30d"]}]},
     "range z-a runs backwards"),
    ({"mappingRules": [{"filter": "dev", "storagePolicies": ["1m:30d"]}]},
     "term 'dev' is not tag:pattern"),
    ({"mappingRules": [{"filter": "a:x a:y", "storagePolicies": ["1m:30d"]}]},
     "tag 'a' appears twice"),
    ({"mappingRules": [{"filter": "a:!", "storagePolicies": ["1m:30d"]}]},
     "'!' needs a pattern"),
    ({"mappingRules": [{"filter": "a:b", "drop": True, "storagePolicies": ["1m:30d"]}]},
     "mappingRules[0].drop: a drop rule keeps nothing"),
    ({"mappingRules": [{"filter": "a:b", "storagePolicies": ["1m:30d"], "tags": []}]},
     "mappingRules[0].tags: unknown key"),
    ({"rollupRules": [{"filter": "a:b", "transforms": [{"transform": {"type": "Rate"}}]}]},
     "rollupRules[0].transforms[0].transform.type: unknown transform 'Rate'"),
    ({"rollupRules": [{"filter": "a:b", "transforms": [{"transform": {"type": "Increase"}}]}]},
     "needs exactly one rollup step"),
    ({"rollupRules": [{"filter": "a:b", "transforms": [
        {"rollup": {"metricName": "x", "groupBy": ["a"], "excludeBy": ["b"]}}]}]},
     "transforms[0].rollup: give exactly one of groupBy and excludeBy"),
    ({"rollupRules": [{"filter": "a:b", "transforms": [
        {"rollup": {"metricName": "x", "groupBy": ["a"]}}, {"aggregate": {"type": "Max"}}]}]},
     "at most one aggregate step, and only as the first"),
    ({"rollupRules": [{"filter": "a:b", "transforms": [
        {"rollup": {"metricName": "x y", "groupBy": ["a"]}}]}]},
     "rollup.metricName: expected a metric name"),
    ({"rollupRules": [{"filter": "a:b", "transforms": [
        {"rollup": {"metricName": "x", "groupBy": ["a"], "aggregations": ["Sum", "Max"]}},
        {"transform": {"type": "Add"}}]}]},
     "transforms[0].rollup.aggregations: transforms after the rollup need exactly one"),
    ({"rollupRules": [{"filter": "a:b", "transforms": [
        {"transform": {"type": "PerSecond"}}, {"transform": {"type": "Absolute"}},
        {"rollup": {"metricName": "x", "groupBy": ["a"]}}]}]},
     "PerSecond before the rollup must be the last"),
    ({"mappingRules": [{"name": "r", "filter": "a:b", "storagePolicies": ["1m:30d"]}],
      "rollupRules": [{"name": "r", "filter": "a:b", "transforms": [
          {"rollup": {"metricName": "x", "groupBy": ["a"]}}]}]}, "rule name 'r' is used twice"),
    ({"mapingRules": []}, "downsample.rules.mapingRules: unknown key"),
]


@pytest.mark.parametrize(("raw", "msg"), BAD)
def test_bad_rules_are_refused_naming_the_key(raw, msg) -> None:
    with pytest.raises(RuleError, match=re.escape(msg)) as e:
        parse_rules(raw)
    assert str(e.value).startswith("downsample.rules")


def test_config_load_names_the_downsample_key(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("downsample:\n  admission: 2m\n  rules:\n    mappingRules:\n"
                    "      - {filter: 'a:[', storagePolicies: [1m:30d]}\n")
    with pytest.raises(ConfigError, match=r"downsample\.rules\.mappingRules\[0\]\.filter"):
        config.load(str(path))
    path.write_text("downsample:\n  admission: 2m\n")
    c = config.load(str(path))
    assert c.downsample.admission_ms == 120_000
    assert c.downsample.rule_set().default_policies == (P1M30D,)


GLOBS = [  # (pattern, value, matches) -- M3's filter semantics
    ("*", "", True), ("*", "anything", True),
    ("sd*", "sda", True), ("sd*", "nvme", False), ("*da", "sda", True), ("*da", "sdb", False),
    ("s*a", "sda", True), ("s*a", "sdab", False), ("*d*", "sda", True), ("*d*", "abc", False),
    ("sd?", "sda", True), ("sd?", "sd", False), ("sd?", "sdab", False),
    ("sd[a-c]", "sdb", True), ("sd[a-c]", "sdd", False), ("sd[!a-c]", "sdd", True),
    ("sd[!a-c]", "sda", False), ("sd[ab]", "sdb", True), ("sd[a-cx-z]", "sdy", True),
    ("{sda,nvme}*", "nvme0", True), ("{sda,nvme}*", "sdb", False),
    ("!sd*", "nvme0", True), ("!sd*", "sda", False), ("a:b", "a:b", True),
    ("{a,ab}c", "abc", True),  # a full glob; M3's prefix matcher would not backtrack here
]


@pytest.mark.parametrize(("pattern", "value", "hit"), GLOBS)
def test_glob_semantics(pattern, value, hit) -> None:
    f = parse_filter(f"device:{pattern}", "f")
    assert f.matches({"device": value}) is hit


def test_terms_on_missing_labels_never_match_and_all_terms_must() -> None:
    f = parse_filter("__name__:up job:!api", "f")
    assert f.matches({"__name__": "up", "job": "web"})
    assert not f.matches({"__name__": "up", "job": "api"})
    assert not f.matches({"__name__": "up"})        # negated term on a missing label
    assert not f.matches({"job": "web"})
    assert parse_filter("", "f").matches({"x": "y"})  # an empty filter matches every series
    # `name` reads a series' own `name` label when it has one, else the metric name
    g = parse_filter("name:disk_used*", "f")
    assert g.matches({"__name__": "disk_used_bytes"})
    assert not g.matches({"__name__": "disk_used_bytes", "name": "container-1"})


@given(st.text(alphabet="ab*?[]!-", max_size=8), st.text(alphabet="ab-!", max_size=8))
def test_globs_agree_with_fnmatch(pattern, value) -> None:
    # fnmatch has the same *, ?, [..], [!..] (no braces, no leading-! negation)
    if pattern.startswith("!"):
        return
    try:
        f = parse_filter(f"t:{pattern}", "f") if pattern else None
    except RuleError:
        return  # fnmatch reads an unclosed '[' literally; we refuse it
    if f is None:
        return
    assert f.matches({"t": value}) is fnmatch.fnmatchcase(value, pattern), (pattern, value)


names = st.sampled_from(["up", "http_requests_total", "http_errors", "disk_used", "x"])
pats = st.sampled_from(["up", "http_*", "http_r*", "*", "disk_*", "!up", "h*s", "x", "{up,x}"])


@given(st.lists(st.tuples(pats, st.sampled_from(["", " job:a*", " job:!b"])), max_size=12),
       names, st.sampled_from([{}, {"job": "a1"}, {"job": "b"}]))
def test_the_name_index_finds_exactly_the_matching_rules(rules, name, extra) -> None:
    rs = parse_rules({"mappingRules": [
        {"name": f"r{i}", "filter": f"__name__:{p}{t}", "storagePolicies": ["1m:30d"]}
        for i, (p, t) in enumerate(rules)]})
    labels = {"__name__": name, **extra}
    brute = [i for i, r in enumerate(rs.mapping) if r.filter.matches(labels)]
    assert CompiledRules(rs).matching(labels) == brute


def test_drop_keeps_other_rules_policies_and_rollups_but_not_raw_or_defaults() -> None:
    rs = parse_rules({
        "mappingRules": [{"filter": "__name__:req_total", "drop": True},
                         {"filter": "__name__:req_*", "storagePolicies": ["1h:5y"],
                          "aggregations": ["Max", "Sum"]}],
        "rollupRules": [{"filter": "__name__:req_total", "transforms": [
            {"rollup": {"metricName": "req:sum", "groupBy": ["svc"]}}]}]})
    plan = CompiledRules(rs).match({"__name__": "req_total", "svc": "a", "pod": "p"})
    assert not plan.store_raw
    assert [(str(o.policy), o.aggregations) for o in plan.outputs] == [("1h:5y", ("Max", "Sum"))]
    assert len(plan.rollups) == 1
    assert output_labels({"__name__": "req_total"}, "Max", 2) == (
        ("__name__", "req_total"), ("m3_aggregation", "max"))
    assert output_labels({"__name__": "req_total"}, "Last", 1) == (("__name__", "req_total"),)


def test_rule_sets_round_trip_through_yaml_and_json() -> None:
    rs = parse_yaml(M3_STYLE)
    assert parse_rules(rs.to_dict()) == rs
    assert parse_rules(yaml.safe_load(yaml.safe_dump(rs.to_dict()))) == rs
    assert parse_rules(json.loads(json.dumps(rs.to_dict()))) == rs
    v2 = rs.successor(parse_yaml(SEED))
    assert v2.version == rs.version + 1 and v2.updated_ms > 0


def test_policies() -> None:
    assert parse_policy("10s:2d", "p") == P10S2D
    assert parse_policy({"resolution": "1h", "retention": "5y"}, "p") == P1H5Y
    assert str(P1H5Y) == "1h:5y" and P1M30D.namespace == "agg_1m_30d"
    assert (P10S2D.block_size_ms, P1M30D.block_size_ms, P1H5Y.block_size_ms) == (
        2 * 3_600_000, 12 * 3_600_000, 86_400_000)
    assert str(StoragePolicy(90_000, 86_400_000 + 90_000)) == "1m30s:1d1m30s"
    with pytest.raises(RuleError, match="retention 1d must be a multiple of resolution 7m"):
        parse_policy("7m:1d", "p")
    assert parse_rules(None).policies() == (P1M30D,)
