"""Daemon configuration: YAML -> frozen dataclasses, validated once at load.

Every key has an embedded default, so ``m3shm serve`` runs with no file at all. A YAML file
overrides any subset; an unknown key or a bad value stops start-up with a :class:`ConfigError`
that names the key (``commitlog.fsync: must be one of every_batch, interval``). Durations are
strings as Prometheus writes them (``500ms``, ``10s``, ``10m``, ``48h``, ``30d``, ``5y``,
``1h30m``); sizes are integers or strings like ``64MiB``.

Storage namespaces use M3's names (``namespaces: [{name: default, retention: 48h, blockSize: 2h,
bufferPast: 10m, bufferFuture: 2m, coldWrites: true}, {name: agg_1m_30d, resolution: 1m,
retention: 30d, blockSize: 12h}]``). Exactly one namespace is unaggregated (no ``resolution``):
remote-written samples land there. Aggregated namespaces come from the downsampling rules'
storage policies (:func:`with_policy_namespaces`): when the list names no aggregated namespace,
one is derived per policy (``1m:30d`` -> ``agg_1m_30d``, block size from
``StoragePolicy.block_size_ms``); when it names some, every policy needs its namespace there
(same resolution and retention) or start-up is refused naming the policy. The embedded default
is therefore ``default`` (raw, 48h) plus ``agg_1m_30d`` (the default policy ``1m:30d``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


_DUR = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w|y))+$")
_DUR_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_DUR_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
           "w": 7 * 86_400_000, "y": 365 * 86_400_000}
_SIZE = re.compile(r"^(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?$")
_SIZE_MUL = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "KB": 10**3,
             "MB": 10**6, "GB": 10**9}


def parse_duration_ms(v: Any, key: str) -> int:
    if isinstance(v, bool):
        raise ConfigError(f"{key}: expected a duration like 10m, got {v!r}")
    if isinstance(v, int | float):
        return int(v * 1000)
    text = str(v).strip()
    if not _DUR.match(text):
        raise ConfigError(f"{key}: expected a duration like 500ms, 10s, 10m, 48h, 30d, 5y, "
                          f"got {v!r}")
    return sum(int(float(n) * _DUR_MS[u]) for n, u in _DUR_PART.findall(text))


def parse_size(v: Any, key: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    m = _SIZE.match(str(v).strip())
    if not m:
        raise ConfigError(f"{key}: expected a size like 1048576 or 64MiB, got {v!r}")
    return int(m.group(1)) * _SIZE_MUL[m.group(2)]


@dataclass(frozen=True)
class ShmConfig:
    """Segment sizes (docs/formats/shm.md). The defaults take ~1.3M active series over the
    default 64 shards (README "Memory"); pages are touched only as series and samples come."""

    lane_bytes: int = 256 << 10        # per (shard, producer) lane; a power of two
    series_per_shard: int = 20480
    arena_bytes: int = 48 << 20        # per shard: labels and open-block chunks
    # Each aggregated namespace's segment (same shards, producers and lanes). The default
    # rules keep every series at 1m, so the series table matches the raw one; so does the
    # arena: a full 12h block of 1m points costs a series about what a full 2h raw block at
    # a 10 s scrape does (1,674 vs 1,576 bytes on real data: perf/ns_sizing.py).
    agg_series_per_shard: int = 20480
    agg_arena_bytes: int = 48 << 20
    # per shard: downsampling cells (docs/formats/aggstore.md); 0 = 2 KiB per series slot
    cell_arena_bytes: int = 0

    def cell_arena(self) -> int:
        """Bytes of downsampling cells per shard (a sparse file: touched as cells are made)."""
        return self.cell_arena_bytes or max(1 << 20, 2048 * self.series_per_shard)


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = 32 << 20          # compressed request body
    max_decompressed_bytes: int = 128 << 20
    max_labels: int = 64
    max_label_name_bytes: int = 256
    max_label_value_bytes: int = 4096
    max_series_per_request: int = 100_000   # more fails the whole request (nothing written)


@dataclass(frozen=True)
class NamespaceConfig:
    """One storage namespace (M3's names in YAML). ``resolution_ms`` 0 = unaggregated."""

    name: str = "default"
    retention_ms: int = 48 * 3_600_000
    block_size_ms: int = 2 * 3_600_000
    buffer_past_ms: int = 10 * 60_000       # out-of-order window behind now (warm writes)
    buffer_future_ms: int = 2 * 60_000
    cold_writes: bool = True                # older than buffer past, within retention
    resolution_ms: int = 0

    @property
    def aggregated(self) -> bool:
        return self.resolution_ms > 0


_NS_KEYS = {"name": "name", "retention": "retention_ms", "blockSize": "block_size_ms",
            "bufferPast": "buffer_past_ms", "bufferFuture": "buffer_future_ms",
            "coldWrites": "cold_writes", "resolution": "resolution_ms"}
_NS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def parse_namespaces(raw: Any) -> tuple[NamespaceConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("namespaces: expected a non-empty list of namespaces, e.g. "
                          "[{name: default, retention: 48h, blockSize: 2h}]")
    out = []
    for i, item in enumerate(raw):
        where = f"namespaces[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(item).__name__}")
        kw: dict[str, Any] = {}
        for key, val in item.items():
            f = _NS_KEYS.get(key)
            if f is None:
                raise ConfigError(f"{where}.{key}: unknown key (known: "
                                  f"{', '.join(sorted(_NS_KEYS))})")
            if f == "name":
                if not isinstance(val, str) or not _NS_NAME.match(val):
                    raise ConfigError(f"{where}.name: expected letters, digits, _ . - "
                                      f"(a directory name), got {val!r}")
                kw[f] = val
            elif f == "cold_writes":
                if not isinstance(val, bool):
                    raise ConfigError(f"{where}.coldWrites: expected true or false, got "
                                      f"{val!r}")
                kw[f] = val
            else:
                kw[f] = parse_duration_ms(val, f"{where}.{key}")
        if "name" not in kw:
            raise ConfigError(f"{where}.name: every namespace needs a name")
        out.append(NamespaceConfig(**kw))
    return tuple(out)


def _validate_namespaces(nss: tuple[NamespaceConfig, ...]) -> None:
    seen: set[str] = set()
    for i, ns in enumerate(nss):
        where = f"namespaces[{i}] ({ns.name})"
        if ns.name in seen:
            raise ConfigError(f"{where}.name: namespace {ns.name!r} is defined twice")
        seen.add(ns.name)
        if ns.block_size_ms < 1000:
            raise ConfigError(f"{where}.blockSize: must be at least 1s")
        if 86_400_000 % ns.block_size_ms and ns.block_size_ms % 86_400_000:
            raise ConfigError(f"{where}.blockSize: must divide a day or be whole days "
                              f"(blocks are aligned to the epoch)")
        if ns.retention_ms < ns.block_size_ms:
            raise ConfigError(f"{where}.retention: must be at least blockSize")
        if not 0 < ns.buffer_past_ms <= ns.block_size_ms:
            raise ConfigError(f"{where}.bufferPast: must be > 0 and at most blockSize")
        if not 0 < ns.buffer_future_ms <= ns.block_size_ms:
            raise ConfigError(f"{where}.bufferFuture: must be > 0 and at most blockSize")
        if ns.aggregated and ns.block_size_ms % ns.resolution_ms:
            raise ConfigError(f"{where}.resolution: must divide blockSize")
    raw = [ns.name for ns in nss if not ns.aggregated]
    if len(raw) != 1:
        raise ConfigError(f"namespaces: exactly one namespace must be unaggregated (no "
                          f"resolution); found {len(raw)}: {raw}")


def policy_namespace(policy: Any, raw: NamespaceConfig, admission_ms: int,
                     forward_delay_ms: int) -> NamespaceConfig:
    """The aggregated namespace derived for a storage policy (m3shm.rules.policy). Its points
    arrive once a window is final (window end + admission, + forward_delay for rollup groups),
    so bufferPast covers that (capped at the block size) and most points are warm writes."""
    block = policy.block_size_ms
    admission = admission_ms or raw.buffer_past_ms
    past = min(block, admission + forward_delay_ms + 2 * policy.resolution_ms)
    return NamespaceConfig(name=policy.namespace, retention_ms=policy.retention_ms,
                           block_size_ms=block, buffer_past_ms=past,
                           buffer_future_ms=min(block, raw.buffer_future_ms),
                           cold_writes=True, resolution_ms=policy.resolution_ms)


def with_policy_namespaces(c: Config) -> Config:
    """``c`` with an aggregated namespace for every storage policy of its rule set: derived
    (appended in policy order) when ``namespaces`` lists no aggregated one, else checked
    against the listed ones (a policy without its namespace, or with another resolution or
    retention, is a ConfigError naming both)."""
    policies = c.downsample.rule_set().policies()
    listed = {ns.name: (i, ns) for i, ns in enumerate(c.namespaces)}
    if not any(ns.aggregated for ns in c.namespaces):
        derived = []
        for p in policies:
            if p.namespace in listed:
                i, _ = listed[p.namespace]
                raise ConfigError(f"namespaces[{i}] ({p.namespace}): the storage policy {p} "
                                  f"writes to this namespace, so it needs resolution: "
                                  f"{str(p).split(':')[0]}")
            ns = policy_namespace(p, c.raw_namespace, c.downsample.admission_ms,
                                  c.downsample.forward_delay_ms)
            try:
                _validate_namespaces((c.raw_namespace, ns))
            except ConfigError as e:
                raise ConfigError(f"downsample.rules: storage policy {p} cannot have a derived "
                                  f"namespace ({e}); list it under namespaces with a block "
                                  f"size that fits") from None
            derived.append(ns)
        return dataclasses.replace(c, namespaces=c.namespaces + tuple(derived))
    for p in policies:
        if p.namespace not in listed:
            raise ConfigError(
                f"downsample.rules: storage policy {p} needs the aggregated namespace "
                f"{p.namespace!r}, which namespaces does not list (list it, e.g. {{name: "
                f"{p.namespace}, resolution: {str(p).split(':')[0]}, retention: "
                f"{str(p).split(':')[1]}}}, or list no aggregated namespace to derive "
                f"them all)")
        i, ns = listed[p.namespace]
        if (ns.resolution_ms, ns.retention_ms) != (p.resolution_ms, p.retention_ms):
            raise ConfigError(
                f"namespaces[{i}] ({ns.name}): storage policy {p} writes here, so resolution "
                f"and retention must be {p.resolution_ms}ms and {p.retention_ms}ms (got "
                f"{ns.resolution_ms}ms and {ns.retention_ms}ms)")
    return c


@dataclass(frozen=True)
class FlushConfig:
    interval_ms: int = 60_000               # how often each worker looks for closed blocks
    retention_interval_ms: int = 300_000    # how often expired filesets are deleted
    snapshot_interval_ms: int = 300_000     # how often open blocks are snapshotted (0: never)


@dataclass(frozen=True)
class IngestConfig:
    reserve_wait_ms: int = 250              # wait for lane room before answering 503
    max_pending_batches: int = 256          # per worker, before 503


@dataclass(frozen=True)
class CommitLogConfig:
    fsync: str = "every_batch"              # every_batch | interval
    fsync_interval_ms: int = 1000
    max_segment_bytes: int = 256 << 20


@dataclass(frozen=True)
class QueryConfig:
    """Per-query limits (refused with 422 before the data is read) and the query service."""

    max_series: int = 1_000_000            # series fetched per query (all selectors)
    max_samples: int = 50_000_000          # samples decoded per query (Prometheus' default)
    max_bytes: int = 2 << 30               # estimated memory per query
    max_concurrency: int = 4               # queries evaluated at once in the daemon; others wait
    timeout_ms: int = 120_000              # default and maximum `timeout` of a query
    lookback_delta_ms: int = 300_000
    catchup_wait_ms: int = 2_000           # wait for shards to apply acknowledged writes


@dataclass(frozen=True)
class DownsampleConfig:
    """``downsample: {rules: {mappingRules: [...], rollupRules: [...]}, admission: 10m}``.

    ``rules`` stays the raw mapping here (parsed and validated by m3shm.rules.ruleset at load,
    errors naming ``downsample.rules...``); see docs/rules.md."""

    rules: Any = None
    admission_ms: int = 0                   # 0 = the raw namespace's bufferPast
    forward_delay_ms: int = 5_000           # extra time rollup group windows stay open

    def rule_set(self) -> Any:
        """The parsed m3shm.rules.ruleset.RuleSet (the embedded default when rules is unset)."""
        from m3shm.rules.ruleset import parse_rules

        return parse_rules(self.rules, "downsample.rules")


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:7201"
    data_dir: str = field(default_factory=lambda: os.environ.get("M3SHM_DATA", "./data"))
    workers: int = 0                        # 0 = one per core
    shards: int = 64
    threads: int = 2                        # C-call thread pool per worker
    shm: ShmConfig = field(default_factory=ShmConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    commitlog: CommitLogConfig = field(default_factory=CommitLogConfig)
    flush: FlushConfig = field(default_factory=FlushConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    namespaces: tuple[NamespaceConfig, ...] = (NamespaceConfig(),)
    downsample: DownsampleConfig = field(default_factory=DownsampleConfig)

    @property
    def raw_namespace(self) -> NamespaceConfig:
        """The unaggregated namespace, where remote-written samples land."""
        return next(ns for ns in self.namespaces if not ns.aggregated)

    def namespace(self, name: str) -> NamespaceConfig:
        for ns in self.namespaces:
            if ns.name == name:
                return ns
        raise KeyError(name)

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    def num_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


_DURATION_KEYS = {"reserve_wait_ms": "reserve_wait", "fsync_interval_ms": "fsync_interval",
                  "interval_ms": "interval", "retention_interval_ms": "retention_interval",
                  "snapshot_interval_ms": "snapshot_interval",
                  "timeout_ms": "timeout", "lookback_delta_ms": "lookback_delta",
                  "catchup_wait_ms": "catchup_wait",
                  "admission_ms": "admission", "forward_delay_ms": "forward_delay"}
_MOVED = {"ingest.retention", "ingest.buffer_past", "ingest.buffer_future", "ingest.block_size"}
_SIZE_KEYS = {"lane_bytes", "arena_bytes", "agg_arena_bytes", "max_body_bytes",
              "max_decompressed_bytes", "max_segment_bytes", "max_bytes", "cell_arena_bytes"}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    by_yaml = {}
    for f in fields(cls):
        by_yaml[_DURATION_KEYS.get(f.name, f.name)] = f
    kwargs: dict[str, Any] = {}
    for key, val in raw.items():
        full = f"{prefix}{key}"
        f = by_yaml.get(key)
        if full in _MOVED:
            raise ConfigError(f"{full}: moved to the namespaces list (retention, blockSize, "
                              "bufferPast, bufferFuture per namespace)")
        if f is None:
            raise ConfigError(f"{full}: unknown key (known: {', '.join(sorted(by_yaml))})")
        default = getattr(cls(), f.name) if f.name != "data_dir" else ""
        if f.name == "namespaces":
            kwargs[f.name] = parse_namespaces(val)
        elif dataclasses.is_dataclass(default):
            kwargs[f.name] = _build(type(default), val, full + ".")
        elif f.name in _DURATION_KEYS:
            kwargs[f.name] = parse_duration_ms(val, full)
        elif f.name in _SIZE_KEYS:
            kwargs[f.name] = parse_size(val, full)
        elif isinstance(default, bool) or not isinstance(default, int | str):
            kwargs[f.name] = val
        elif isinstance(default, int):
            if isinstance(val, bool) or not isinstance(val, int):
                raise ConfigError(f"{full}: expected an integer, got {val!r}")
            kwargs[f.name] = val
        else:
            if not isinstance(val, str):
                raise ConfigError(f"{full}: expected a string, got {val!r}")
            kwargs[f.name] = val
    return cls(**kwargs)


def validate(c: Config) -> Config:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {what}")

    m = re.match(r"^(.+):(\d+)$", c.listen)
    need(bool(m) and 0 <= int(m.group(2)) < 65536, "listen", f"expected HOST:PORT, got "
         f"{c.listen!r}")
    need(c.workers >= 0 and c.workers <= 256, "workers", "must be 0 (one per core) .. 256")
    need(1 <= c.shards <= 4096, "shards", "must be 1..4096")
    need(c.shards >= c.num_workers(), "shards", f"must be at least the number of workers "
         f"({c.num_workers()})")
    need(1 <= c.threads <= 64, "threads", "must be 1..64")
    lb = c.shm.lane_bytes
    need(lb >= 64 << 10 and lb & (lb - 1) == 0, "shm.lane_bytes",
         "must be a power of two >= 64KiB")
    need(c.shm.series_per_shard >= 1, "shm.series_per_shard", "must be >= 1")
    need(c.shm.arena_bytes >= 64 << 10 and c.shm.arena_bytes % 512 == 0, "shm.arena_bytes",
         "must be >= 64KiB and a multiple of 512")
    need(c.shm.agg_series_per_shard >= 1, "shm.agg_series_per_shard", "must be >= 1")
    need(c.shm.agg_arena_bytes >= 64 << 10 and c.shm.agg_arena_bytes % 512 == 0,
         "shm.agg_arena_bytes", "must be >= 64KiB and a multiple of 512")
    need(c.shm.cell_arena_bytes == 0 or 4096 <= c.shm.cell_arena_bytes <= 1 << 40,
         "shm.cell_arena_bytes", "must be 0 (auto) or 4 KiB .. 1 TiB")
    need(c.limits.max_body_bytes > 0, "limits.max_body_bytes", "must be > 0")
    need(c.limits.max_decompressed_bytes > 0, "limits.max_decompressed_bytes", "must be > 0")
    need(1 <= c.limits.max_labels <= 256, "limits.max_labels", "must be 1..256")
    need(1 <= c.limits.max_label_name_bytes <= 4096, "limits.max_label_name_bytes",
         "must be 1..4096")
    need(1 <= c.limits.max_label_value_bytes <= 16384, "limits.max_label_value_bytes",
         "must be 1..16384")
    _validate_namespaces(c.namespaces)
    need(c.flush.interval_ms > 0, "flush.interval", "must be > 0")
    need(c.flush.retention_interval_ms > 0, "flush.retention_interval", "must be > 0")
    need(c.flush.snapshot_interval_ms >= 0, "flush.snapshot_interval", "must be >= 0")
    need(c.limits.max_series_per_request >= 1, "limits.max_series_per_request", "must be >= 1")
    need(c.commitlog.fsync in ("every_batch", "interval"), "commitlog.fsync",
         "must be one of every_batch, interval")
    q = c.query
    for key in ("max_series", "max_samples", "max_bytes"):
        need(getattr(q, key) >= 0, f"query.{key}", "must be >= 0 (0 = unlimited)")
    need(1 <= q.max_concurrency <= 256, "query.max_concurrency", "must be 1..256")
    need(q.timeout_ms > 0, "query.timeout", "must be > 0")
    need(q.lookback_delta_ms > 0, "query.lookback_delta", "must be > 0")
    need(q.catchup_wait_ms >= 0, "query.catchup_wait", "must be >= 0")
    need(c.commitlog.fsync_interval_ms > 0, "commitlog.fsync_interval", "must be > 0")
    need(c.downsample.admission_ms >= 0, "downsample.admission", "must be >= 0")
    need(c.downsample.forward_delay_ms >= 0, "downsample.forward_delay", "must be >= 0")
    c.downsample.rule_set()  # raises a ConfigError naming the downsample.rules key
    return with_policy_namespaces(c)


def load(path: str | None = None, **overrides: Any) -> Config:
    """Load the YAML file at ``path`` (or the defaults) and apply command-line overrides."""
    raw: dict[str, Any] = {}
    if path:
        import yaml

        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML: {e}") from e
    cfg = _build(Config, raw, "")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    return validate(cfg)


# -- live reload (SIGHUP) -------------------------------------------------------------------
# Keys a running daemon applies on SIGHUP; every other key is fixed for the life of the
# process (listen address, data dir, workers, shards, segment sizes, threads, commit log,
# flush, namespaces).
LIVE_SECTIONS = ("limits", "ingest")
# downsample.rules: a change becomes a new rule-set version (m3shm/rules/versions.py)
LIVE_KEYS: tuple[str, ...] = ("downsample.rules",)


def flatten(c: Any, prefix: str = "") -> dict[str, Any]:
    """``{"limits.max_labels": 64, ...}`` for a config (field names, not YAML keys)."""
    out: dict[str, Any] = {}
    for f in fields(c):
        v = getattr(c, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def _is_live(key: str) -> bool:
    return key.split(".", 1)[0] in LIVE_SECTIONS or key in LIVE_KEYS


def yaml_key(key: str) -> str:
    """The YAML spelling of a flattened field name (``ingest.retention_ms`` -> ``…retention``)."""
    head, _, last = key.rpartition(".")
    last = _DURATION_KEYS.get(last, last)
    return f"{head}.{last}" if head else last


def live_update(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """The config to run after a reload: ``new``'s live keys over ``old``'s fixed ones.
    Returns it with the YAML names of the live keys that changed and of the fixed keys that
    changed but are kept (each with its old and new value)."""
    fo, fn = flatten(old), flatten(new)
    changed = [k for k in fo if fo[k] != fn[k]]
    live = [k for k in changed if _is_live(k)]
    fixed = [k for k in changed if not _is_live(k)]
    merged = from_dict({**fo, **{k: fn[k] for k in live}})

    def what(k: str) -> str:
        if k == "downsample.rules":
            return f"{k}: changed (a new rules version, below)"
        return f"{yaml_key(k)}: {fo[k]!r} -> {fn[k]!r}"

    return validate(merged), [what(k) for k in live], [what(k) for k in fixed]


def from_dict(flat: dict[str, Any]) -> Config:
    """Inverse of :func:`flatten` (used to hand an applied config to running workers)."""
    def build(cls: type, prefix: str) -> Any:
        kwargs: dict[str, Any] = {}
        proto = cls()
        for f in fields(cls):
            default = getattr(proto, f.name)
            if dataclasses.is_dataclass(default):
                kwargs[f.name] = build(type(default), f"{prefix}{f.name}.")
            else:
                kwargs[f.name] = flat[f"{prefix}{f.name}"]
        return cls(**kwargs)

    return build(Config, "")
