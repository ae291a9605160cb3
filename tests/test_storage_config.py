"""Namespaces config (M3's names, Prometheus durations) and the immutable properties recorded
in meta.json: errors name the key; a block-size change of a namespace with data is refused at
start-up by a real daemon."""

from __future__ import annotations

import json

import pytest
import yaml
from test_daemon_harness import Daemon

from m3shm import config
from m3shm.config import ConfigError, NamespaceConfig


def _load(tmp_path, text: str) -> config.Config:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return config.load(str(p))


def test_embedded_default_is_raw_2d_plus_1m_30d():
    c = config.load()
    assert c.namespaces == (
        NamespaceConfig("default", 48 * 3_600_000, 2 * 3_600_000, 10 * 60_000, 2 * 60_000,
                        True, 0),
        # from the default policy 1m:30d: 12h blocks; bufferPast = admission (the raw
        # bufferPast) + forward delay (5s) + 2 windows
        NamespaceConfig("agg_1m_30d", 30 * 86_400_000, 12 * 3_600_000, 725_000, 120_000,
                        True, 60_000))
    assert c.raw_namespace.name == "default"
    assert config.validate(c) == c  # deriving again changes nothing


def test_namespaces_derived_from_the_rules_policies(tmp_path):
    c = _load(tmp_path, """
namespaces: [{name: default, blockSize: 1h, retention: 2d}]
downsample:
  admission: 1m
  rules:
    mappingRules:
      - {name: disk, filter: "name:disk_used* device:sd*",
         policies: [10s:2d, 1m:30d, {resolution: 1h, retention: 5y}]}
    rollupRules:
      - name: r
        filter: "__name__:http_requests_total"
        transforms:
          - rollup: {metricName: by_ep, groupBy: [endpoint], aggregations: [Sum]}
        storagePolicies: [30s:1d]
""")
    got = {ns.name: (ns.resolution_ms, ns.retention_ms, ns.block_size_ms, ns.buffer_past_ms)
           for ns in c.namespaces}
    assert got == {"default": (0, 2 * 86_400_000, 3_600_000, 600_000),
                   "agg_10s_2d": (10_000, 2 * 86_400_000, 2 * 3_600_000, 85_000),
                   "agg_30s_1d": (30_000, 86_400_000, 2 * 3_600_000, 125_000),
                   "agg_1m_30d": (60_000, 30 * 86_400_000, 12 * 3_600_000, 185_000),
                   "agg_1h_5y": (3_600_000, 5 * 365 * 86_400_000, 86_400_000, 7_265_000)}
    assert c.namespaces[0].name == "default"


@pytest.mark.parametrize("text,needle", [
    # explicit aggregated namespaces: every policy needs its own
    ("namespaces: [{name: default}, {name: agg_1h_5y, resolution: 1h, retention: 5y}]\n",
     "downsample.rules: storage policy 1m:30d needs the aggregated namespace 'agg_1m_30d', "
     "which namespaces does not list"),
    ("namespaces: [{name: default}, {name: agg_1m_30d, resolution: 1m, retention: 7d}]\n",
     "namespaces[1] (agg_1m_30d): storage policy 1m:30d writes here, so resolution and "
     "retention must be 60000ms and 2592000000ms"),
    ("namespaces: [{name: agg_1m_30d}]\n",
     "namespaces[0] (agg_1m_30d): the storage policy 1m:30d writes to this namespace, so it "
     "needs resolution: 1m"),
    ("downsample: {rules: {defaultPolicies: [7m:14d]}}\n",
     "downsample.rules: storage policy 7m:14d cannot have a derived namespace"),
])
def test_policy_namespaces_refused_naming_the_policy(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert needle in str(e.value)


def test_agg_segment_keys(tmp_path):
    c = _load(tmp_path, "shm: {agg_arena_bytes: 1MiB, agg_series_per_shard: 100}\n")
    assert (c.shm.agg_arena_bytes, c.shm.agg_series_per_shard) == (1 << 20, 100)
    with pytest.raises(ConfigError, match="shm.agg_arena_bytes: must be >= 64KiB"):
        _load(tmp_path, "shm: {agg_arena_bytes: 1000}\n")


def test_issue_example_parses(tmp_path):
    c = _load(tmp_path, """
namespaces:
  - {name: default, retention: 48h, blockSize: 2h, bufferPast: 10m, bufferFuture: 2m,
     coldWrites: true}
  - {name: agg_1m_30d, resolution: 1m, retention: 30d, blockSize: 12h}
""")
    raw, agg = c.namespaces
    assert raw == NamespaceConfig("default", 48 * 3_600_000, 2 * 3_600_000, 600_000, 120_000,
                                  True, 0)
    assert agg.name == "agg_1m_30d" and agg.aggregated
    assert (agg.resolution_ms, agg.retention_ms, agg.block_size_ms) == (
        60_000, 30 * 86_400_000, 12 * 3_600_000)
    assert agg.buffer_past_ms == 600_000 and agg.cold_writes  # defaults


@pytest.mark.parametrize("text,ms", [("10s", 10_000), ("1m", 60_000), ("2h", 7_200_000),
                                     ("30d", 30 * 86_400_000), ("5y", 5 * 365 * 86_400_000),
                                     ("1w", 7 * 86_400_000), ("1h30m", 5_400_000),
                                     ("500ms", 500)])
def test_prometheus_durations(text, ms):
    assert config.parse_duration_ms(text, "k") == ms


@pytest.mark.parametrize("ns,needle", [
    ("{name: default, blockSize: 2x}", "namespaces[0].blockSize: expected a duration"),
    ("{name: default, bogus: 1}", "namespaces[0].bogus: unknown key"),
    ("{retention: 2d}", "namespaces[0].name: every namespace needs a name"),
    ("{name: 'a/b'}", "namespaces[0].name: expected letters"),
    ("{name: default, coldWrites: maybe}", "namespaces[0].coldWrites: expected true or false"),
    ("{name: default, retention: 1h}", "namespaces[0] (default).retention: must be at least "
                                       "blockSize"),
    ("{name: default, bufferPast: 3h}", "namespaces[0] (default).bufferPast"),
    ("{name: default, blockSize: 7h}", "namespaces[0] (default).blockSize: must divide a day"),
    ("{name: a, resolution: 1m}", "exactly one namespace must be unaggregated"),
])
def test_namespace_errors_name_the_key(tmp_path, ns, needle):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, f"namespaces:\n  - {ns}\n")
    assert needle in str(e.value)


def test_duplicate_and_moved_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"namespaces\[1\] \(x\)\.name: .* defined twice"):
        _load(tmp_path, "namespaces: [{name: x}, {name: x, resolution: 1m}]\n")
    with pytest.raises(ConfigError, match="ingest.block_size: moved to the namespaces list"):
        _load(tmp_path, "ingest: {block_size: 2h}\n")
    with pytest.raises(ConfigError, match="namespaces: expected a non-empty list"):
        _load(tmp_path, "namespaces: []\n")


def test_block_size_change_refused_at_start_up(tmp_path):
    d = Daemon(tmp_path, workers=1, extra="namespaces: [{name: default, blockSize: 2h}]\n")
    d.start()
    t = __import__("time").time()
    assert d.write([({"__name__": "m"}, [(int(t * 1000) - 1000, 1.0)])])[0] == 204
    assert d.stop() == 0
    meta = json.loads((d.data / "meta.json").read_text())
    assert meta["namespaces"]["default"]["blockSize"] == 7_200_000
    d.cfg.write_text(d.cfg.read_text().replace("blockSize: 2h", "blockSize: 1h"))
    d.start(wait=False)
    assert d.proc.wait(30) == 2
    assert ("namespaces[0].blockSize: namespace 'default' holds data written with "
            "blockSize=7200000ms; it cannot change (configured 3600000ms)") in d.logtext()
    # a new namespace may be added next to it
    cfg = yaml.safe_load(d.cfg.read_text())
    cfg["namespaces"] = [{"name": "default", "blockSize": "2h"},
                         {"name": "agg_1m_30d", "resolution": "1m", "retention": "30d",
                          "blockSize": "6h"}]
    d.cfg.write_text(yaml.safe_dump(cfg))
    d.start()
    assert d.stop() == 0
    assert json.loads((d.data / "meta.json").read_text())["namespaces"]["agg_1m_30d"] == {
        "blockSize": 6 * 3_600_000, "resolution": 60_000}
