"""Rule-set versions (m3shm/rules/versions.py): activation times, the chain, start-up
precedence, the namespace check, and the file."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from m3shm.config import NamespaceConfig
from m3shm.rules import versions
from m3shm.rules.policy import RuleError, parse_policy
from m3shm.rules.ruleset import RuleSet, parse_yaml

MIN, HOUR = 60_000, 3_600_000
T0 = 1_700_000_000_000 // HOUR * HOUR    # an hour boundary

ONE_MIN = parse_yaml("defaultPolicies: [1m:30d]")
TEN_S = parse_yaml("defaultPolicies: [10s:2d]")
HOURLY = parse_yaml("""
defaultPolicies: [1m:30d]
mappingRules:
  - {name: long, filter: "__name__:up", storagePolicies: [1h:5y, 10s:2d]}
""")
SEVEN = parse_yaml("defaultPolicies: [7s:7d, 1m:30d]")
DAY = 24 * HOUR


def _ns(*policies: str) -> tuple[NamespaceConfig, ...]:
    """The raw namespace and one aggregated namespace per policy (``1m:30d``)."""
    out = [NamespaceConfig()]
    for p in policies:
        pol = parse_policy(p, "p")
        out.append(NamespaceConfig(pol.namespace, pol.retention_ms, DAY,
                                   resolution_ms=pol.resolution_ms))
    return tuple(out)


ALL_NS = _ns("1m:30d", "10s:2d", "1h:5y", "7s:7d")


def test_activation_is_the_next_boundary_of_every_policy_after_the_margin() -> None:
    c = versions.first(ONE_MIN, T0, "d")
    # old 1m, new 10s: the boundary is a minute's; margin 12 min from T0 + 5 s
    c2 = versions.append(c, TEN_S, "api", T0 + 5_000, 12 * MIN)
    assert c2.newest.activation_ms == T0 + 13 * MIN and c2.newest.version == 2
    assert c2.newest.rules.updated_ms == T0 + 5_000 and c2.newest.source == "api"
    # exactly on a boundary: strictly after it
    assert versions.append(c, TEN_S, "api", T0, 12 * MIN).newest.activation_ms == T0 + 13 * MIN
    # a 1h policy in the new set: an hour boundary
    assert versions.append(c, HOURLY, "api", T0 + 5_000, 12 * MIN).newest.activation_ms == \
        T0 + HOUR
    # 7 s and 1 min do not divide each other: their least common multiple, 7 min
    a = versions.append(c, SEVEN, "api", T0 + 5_000, 12 * MIN).newest.activation_ms
    assert a % (7 * MIN) == 0 and T0 + 12 * MIN + 5_000 < a <= T0 + 12 * MIN + 5_000 + 7 * MIN
    assert versions.window_lcm([SEVEN]) == 7 * MIN


def test_a_later_version_never_activates_before_an_earlier_one() -> None:
    c = versions.first(ONE_MIN, T0, "d")
    c2 = versions.append(c, HOURLY, "api", T0 + 5_000, 12 * MIN)     # at T0 + 1h
    c3 = versions.append(c2, ONE_MIN, "api", T0 + 6_000, 12 * MIN)   # old is HOURLY: an hour
    assert c3.newest.activation_ms == T0 + 2 * HOUR
    assert [v.version for v in c3.versions] == [1, 2, 3]
    # a set whose boundaries are finer than the pending one's still comes after it
    c2b = versions.append(c, HOURLY, "api", T0 + 5_000, 12 * MIN)
    c3b = versions.append(c2b, TEN_S, "api", T0 + 6_000, 0)
    assert c3b.newest.activation_ms > c2b.newest.activation_ms
    # in force at each instant; pruning keeps the one in force and the later ones
    assert c3.in_force(T0 + HOUR - 1).version == 1
    assert c3.in_force(T0 + HOUR).version == 2
    assert c3.in_force(T0 + 2 * HOUR).version == 3
    assert [v.version for v in c3.pruned(T0 + HOUR + 1).versions] == [2, 3]
    c4 = versions.append(c3, TEN_S, "config", T0 + 2 * HOUR + 1, 12 * MIN, "new")
    assert [v.version for v in c4.versions] == [3, 4] and c4.config_digest == "new"


def test_the_chain_round_trips_through_the_file_and_bad_files_are_named(tmp_path) -> None:
    assert versions.load(tmp_path) is None
    c = versions.append(versions.first(ONE_MIN, T0, "d1"), HOURLY, "api", T0 + 1, 12 * MIN)
    versions.save(c, tmp_path)
    assert versions.load(tmp_path) == c
    doc = json.loads((tmp_path / "rules.json").read_text())
    assert doc["format"] == 2 and [v["version"] for v in doc["versions"]] == [1, 2]
    assert doc["versions"][1]["rules"]["mappingRules"][0]["filter"] == "__name__:up"
    assert not (tmp_path / "rules.json.tmp").exists()
    (tmp_path / "rules.json").write_text('{"format": 1, "version": 1}')
    with pytest.raises(RuleError, match="rules.json: expected format 2, got 1"):
        versions.load(tmp_path)
    bad = dict(doc)
    bad["versions"] = [dict(doc["versions"][0], rules={"mappingRules": [
        {"filter": "x", "storagePolicies": ["1m:30d"]}]})]
    (tmp_path / "rules.json").write_text(json.dumps(bad))
    with pytest.raises(RuleError, match=r"rules.json.versions\[0\].rules.mappingRules\[0\]"
                                        r"\.filter: term 'x'"):
        versions.load(tmp_path)
    bad["versions"] = [doc["versions"][1], doc["versions"][0]]
    (tmp_path / "rules.json").write_text(json.dumps(bad))
    with pytest.raises(RuleError, match="versions and activations must increase"):
        versions.load(tmp_path)


def test_missing_namespaces_are_named_like_config_errors() -> None:
    assert versions.missing_namespace(HOURLY, ALL_NS) is None
    msg = versions.missing_namespace(HOURLY, _ns("1m:30d", "10s:2d"))
    assert msg is not None and msg.startswith(
        "downsample.rules.mappingRules[0].storagePolicies[0]: storage policy 1h:5y writes to "
        "namespace 'agg_1h_5y', which the running daemon does not have; a new namespace needs "
        "a restart")
    msg = versions.missing_namespace(RuleSet(), _ns())
    assert msg is not None and msg.startswith("downsample.rules.defaultPolicies[0]: storage "
                                              "policy 1m:30d")
    # a namespace of that name with another resolution is not the policy's
    other = (NamespaceConfig(), NamespaceConfig("agg_1m_30d", 30 * DAY, DAY, resolution_ms=5000))
    assert versions.missing_namespace(RuleSet(), other) is not None
    w = versions.writers(HOURLY)
    assert [(x["policy"], x["namespace"], x["rules"]) for x in w] == [
        ("10s:2d", "agg_10s_2d", ["long"]), ("1m:30d", "agg_1m_30d", ["default"]),
        ("1h:5y", "agg_1h_5y", ["long"])]


def _start(tmp: Path, rules: RuleSet, mtime: int, now: int, names=ALL_NS):
    return versions.start_up(tmp, rules, mtime, names, now, 12 * MIN)


def test_start_up_precedence(tmp_path) -> None:
    # first start: the config's rules are version 1, in force at once
    c, why = _start(tmp_path, ONE_MIN, T0, T0)
    assert [v.version for v in c.versions] == [1] and c.newest.activation_ms == 0
    assert "version 1" in why and versions.load(tmp_path) == c
    # unchanged config, restarted: kept
    c, why = _start(tmp_path, ONE_MIN, T0 + 9 * HOUR, T0 + HOUR)
    assert c.newest.version == 1 and "unchanged" in why
    # a PUT made version 2; an unchanged config (even one touched later) keeps it
    put = versions.append(c, HOURLY, "api", T0 + 2 * HOUR, 12 * MIN)
    versions.save(put, tmp_path)
    c, why = _start(tmp_path, ONE_MIN, T0 + 9 * HOUR, T0 + 3 * HOUR)
    assert c.newest.version == 2 and c.newest.source == "api"
    # the config's rules edited before the PUT: the saved version is newer and wins, and the
    # edit counts as read (a later SIGHUP with the same file does not undo the PUT)
    c, why = _start(tmp_path, TEN_S, T0 + HOUR, T0 + 4 * HOUR)
    assert c.newest.version == 2 and "newer than the config file" in why
    assert c.config_digest == versions.digest(TEN_S)
    # edited after the PUT: the config's rules are version 3, activated like a live change
    c, why = _start(tmp_path, SEVEN, T0 + 5 * HOUR, T0 + 5 * HOUR)
    assert c.newest.version == 3 and c.newest.source == "config"
    assert c.newest.activation_ms > T0 + 5 * HOUR + 12 * MIN
    assert [v.version for v in c.versions] == [2, 3]      # version 1 pruned
    assert versions.load(tmp_path) == c


def test_start_up_drops_a_saved_version_whose_namespace_is_gone(tmp_path) -> None:
    c, _ = _start(tmp_path, ONE_MIN, T0, T0)
    versions.save(versions.append(c, HOURLY, "api", T0 + 2 * HOUR, 12 * MIN), tmp_path)
    c, why = _start(tmp_path, ONE_MIN, T0, T0 + 3 * HOUR, _ns("1m:30d"))
    assert c.newest.version == 3 and c.newest.rules.mapping == ()
    assert "rules.json version 2.mappingRules[0].storagePolicies[0]" in why


def test_writers_exclude_each_other_through_the_lock(tmp_path) -> None:
    """Threads appending under the lock never lose a version (the PUT path's pattern)."""
    versions.save(versions.first(ONE_MIN, T0, "d"), tmp_path)

    def put(n: int) -> None:
        for _ in range(n):
            with versions.locked(tmp_path):
                c = versions.load(tmp_path)
                assert c is not None
                versions.save(versions.append(c, TEN_S, "api", T0, 0), tmp_path)

    ts = [threading.Thread(target=put, args=(10,)) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    c = versions.load(tmp_path)
    assert c is not None and c.newest.version == 41
    assert os.path.exists(tmp_path / "rules.lock")
