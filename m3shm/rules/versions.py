"""Rule-set versions: the chain kept in ``<data>/rules.json`` and how it changes while running.

A rule set changes (``PUT /api/v1/rules``, SIGHUP with edited rules, a start with an edited
config) by appending a new version to the chain with an **activation time**: windows that
start at or after it (samples stamped after it) use the new set, earlier ones the set before
it. The activation is computed once, by whoever writes the change, and stored, so every
worker switches at the same instant:

    activation = the first multiple of L after now + admission + bufferFuture

where L is the least common multiple of every resolution of the set in force before it and
of the new set (the coarsest resolution when, as usual, the others divide it). So the
activation is a window boundary of every policy involved: no window of either set straddles
it, so none is counted twice or lost. ``now + admission + bufferFuture`` leaves every worker
time to learn the new version before any sample it governs can arrive (a sample is accepted
up to bufferFuture ahead of now), and keeps windows the old set may still receive open. An
activation is also always after the previous version's, so versions take over in order.

The chain holds the set in force now and every later one not yet in force (older ones are
pruned when a change is written); a worker that (re)starts installs them all, in order, so a
restart between a change and its activation still switches at the right boundary.

Writers (the supervisor at start and on SIGHUP, a worker answering PUT) hold an flock on
``<data>/rules.lock`` for the read-modify-write, write the file atomically (temp file, fsync,
rename, fsync of the directory) and then store the new version in the stats file's header,
where every worker's heartbeat looks for it. Format: docs/formats/rules.md. Imports no numpy
(the supervisor uses it before forking).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from m3shm.atomicfile import replace_text
from m3shm.config import NamespaceConfig
from m3shm.rules.policy import RuleError, StoragePolicy
from m3shm.rules.ruleset import RuleSet, parse_rules

RULES_FILE = "rules.json"
LOCK_FILE = "rules.lock"
FILE_FORMAT = 2
SOURCES = ("config", "api")


@dataclass(frozen=True)
class Version:
    """One version of the rule set (``rules.version``) and when it takes over."""

    rules: RuleSet
    activation_ms: int          # windows starting at or after it use this set; 0 = always
    source: str                 # "config" (start-up, SIGHUP) or "api" (PUT /api/v1/rules)

    @property
    def version(self) -> int:
        return self.rules.version

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "updated_ms": self.rules.updated_ms,
                "activation_ms": self.activation_ms, "source": self.source,
                "rules": self.rules.to_dict()}


@dataclass(frozen=True)
class Chain:
    """The versions that matter now, oldest first (the first was in force when the chain was
    written), and the digest of the config's rules the daemon last read."""

    versions: tuple[Version, ...]
    config_digest: str

    @property
    def newest(self) -> Version:
        return self.versions[-1]

    def in_force(self, now_ms: int) -> Version:
        """The version whose windows start at ``now_ms``."""
        cur = self.versions[0]
        for v in self.versions[1:]:
            if v.activation_ms <= now_ms:
                cur = v
        return cur

    def pruned(self, now_ms: int) -> Chain:
        """Without the versions that no window starting at or after ``now_ms`` uses."""
        cur = self.in_force(now_ms)
        return replace(self, versions=tuple(v for v in self.versions
                                            if v.version >= cur.version))


def digest(rs: RuleSet) -> str:
    """Identity of a rule set's content (not its version): to tell whether the config's rules
    changed since the daemon last read them."""
    text = json.dumps(rs.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def window_lcm(sets: Iterable[RuleSet]) -> int:
    """The least common multiple of every resolution the sets write (ms)."""
    out = 1
    for rs in sets:
        for p in rs.policies():
            out = math.lcm(out, p.resolution_ms)
    return out


def activation_after(prev: Version, new: RuleSet, now_ms: int, margin_ms: int) -> int:
    """When ``new`` takes over from ``prev`` (see the module docstring)."""
    step = window_lcm((prev.rules, new))
    at = ((now_ms + margin_ms) // step + 1) * step
    if at <= prev.activation_ms:
        at = (prev.activation_ms // step + 1) * step
    return at


def margin_ms(admission_ms: int, buffer_past_ms: int, buffer_future_ms: int) -> int:
    """``admission + bufferFuture`` (admission 0 = the raw namespace's bufferPast)."""
    return (admission_ms or buffer_past_ms) + buffer_future_ms


def append(chain: Chain, new: RuleSet, source: str, now_ms: int, margin: int,
           config_digest: str | None = None) -> Chain:
    """``chain`` with ``new`` as its next version, activated per the module docstring."""
    if source not in SOURCES:
        raise ValueError(source)
    chain = chain.pruned(now_ms)
    prev = chain.newest
    rs = replace(new, version=prev.version + 1, updated_ms=now_ms)
    v = Version(rs, activation_after(prev, rs, now_ms, margin), source)
    return Chain(chain.versions + (v,), config_digest or chain.config_digest)


def first(rules: RuleSet, now_ms: int, config_digest: str) -> Chain:
    """The chain of a data directory that has none yet: ``rules`` as version 1, always."""
    return Chain((Version(replace(rules, version=1, updated_ms=now_ms), 0, "config"),),
                 config_digest)


# -- namespaces ------------------------------------------------------------------------------
def missing_namespace(rs: RuleSet, namespaces: Iterable[NamespaceConfig],
                      key: str = "downsample.rules") -> str | None:
    """A config-style error naming the first policy of ``rs`` whose aggregated namespace
    (same name, resolution and retention) is not among ``namespaces`` (a running daemon
    cannot add one), or None."""
    have = {(ns.name, ns.resolution_ms, ns.retention_ms) for ns in namespaces}

    def lacks(p: StoragePolicy) -> bool:
        return (p.namespace, p.resolution_ms, p.retention_ms) not in have

    def msg(where: str, p: StoragePolicy) -> str:
        return (f"{where}: storage policy {p} writes to namespace {p.namespace!r}, which the "
                f"running daemon does not have; a new namespace needs a restart (add the rule "
                f"or the namespace to the config file and restart m3shm)")

    for i, m in enumerate(rs.mapping):
        for j, p in enumerate(m.policies):
            if lacks(p):
                return msg(f"{key}.mappingRules[{i}].storagePolicies[{j}]", p)
    for i, r in enumerate(rs.rollup):
        for j, p in enumerate(r.policies):
            if lacks(p):
                return msg(f"{key}.rollupRules[{i}].storagePolicies[{j}]", p)
    for j, p in enumerate(rs.default_policies):
        if lacks(p):
            return msg(f"{key}.defaultPolicies[{j}]", p)
    return None


def writers(rs: RuleSet) -> list[dict[str, Any]]:
    """Each policy of ``rs`` with its namespace and the rules that write to it (``default``
    for the default policies, which every series not dropped gets)."""
    by: dict[StoragePolicy, list[str]] = {p: [] for p in rs.policies()}
    for p in rs.default_policies:
        by[p].append("default")
    for m in rs.mapping:
        for p in m.policies:
            by[p].append(m.name)
    for r in rs.rollup:
        for p in r.policies or rs.default_policies:
            by[p].append(r.name)
    return [{"policy": str(p), "namespace": p.namespace, "resolution_ms": p.resolution_ms,
             "retention_ms": p.retention_ms, "block_size_ms": p.block_size_ms, "rules": names}
            for p, names in sorted(by.items())]


# -- the file --------------------------------------------------------------------------------
def dumps(chain: Chain) -> str:
    return json.dumps({"format": FILE_FORMAT, "config_digest": chain.config_digest,
                       "versions": [v.to_dict() for v in chain.versions]}, indent=1)


def _int(doc: dict[str, Any], k: str, where: str, low: int = 0) -> int:
    v = doc.get(k)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise RuleError(f"{where}.{k}: expected an integer >= {low}, got {v!r}")
    return v


def loads(text: str, where: str) -> Chain:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise RuleError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else doc
        raise RuleError(f"{where}: expected format {FILE_FORMAT}, got {got!r}")
    raw = doc.get("versions")
    if not isinstance(raw, list) or not raw:
        raise RuleError(f"{where}.versions: expected a non-empty list")
    out: list[Version] = []
    for i, d in enumerate(raw):
        w = f"{where}.versions[{i}]"
        if not isinstance(d, dict):
            raise RuleError(f"{w}: expected a mapping, got {d!r}")
        ver, upd = _int(d, "version", w, 1), _int(d, "updated_ms", w)
        act = _int(d, "activation_ms", w)
        if d.get("source") not in SOURCES:
            raise RuleError(f"{w}.source: expected one of {', '.join(SOURCES)}, got "
                            f"{d.get('source')!r}")
        if out and (ver <= out[-1].version or act < out[-1].activation_ms):
            raise RuleError(f"{w}: versions and activations must increase")
        rs = replace(parse_rules(d.get("rules"), f"{w}.rules"), version=ver, updated_ms=upd)
        out.append(Version(rs, act, d["source"]))
    cd = doc.get("config_digest")
    if not isinstance(cd, str):
        raise RuleError(f"{where}.config_digest: expected a string, got {cd!r}")
    return Chain(tuple(out), cd)


def save(chain: Chain, data_dir: str | os.PathLike[str]) -> Path:
    """Write ``data_dir/rules.json`` atomically (temp file, fsync, rename, fsync the dir)."""
    path = Path(data_dir) / RULES_FILE
    replace_text(path, dumps(chain), sync_dir=True)
    return path


def load(data_dir: str | os.PathLike[str]) -> Chain | None:
    """The chain saved in ``data_dir``, or None if there is none."""
    path = Path(data_dir) / RULES_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return loads(text, str(path))


@contextlib.contextmanager
def locked(data_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``data_dir/rules.lock`` (flock) for a read-modify-write of the chain. Threads and
    processes each open it anew, so they exclude each other."""
    fd = os.open(os.path.join(data_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# -- start-up --------------------------------------------------------------------------------
def start_up(data_dir: str | os.PathLike[str], config_rules: RuleSet, config_mtime_ms: int,
             namespaces: Iterable[NamespaceConfig], now_ms: int, margin: int) -> tuple[Chain, str]:
    """Decide the chain to start with and write it. The saved chain wins when the config's
    rules are unchanged since the daemon last read them, or when they changed but the file
    was written before the newest saved version (it came from the API later); otherwise the
    config's rules become the next version. A saved version needing a namespace this config
    lacks loses to the config's rules. Returns the chain and a line for the log."""
    names = list(namespaces)
    d = digest(config_rules)
    with locked(data_dir):
        saved = load(data_dir)
        if saved is None:
            chain = first(config_rules, now_ms, d)
            why = "no saved rules: the config's rules are version 1"
        else:
            saved = saved.pruned(now_ms)
            new = saved.newest
            lacking = missing_namespace(new.rules, names, f"{RULES_FILE} version {new.version}")
            if lacking is not None and missing_namespace(config_rules, names) is not None:
                lacking = None  # the config's need one too: refusing that is the config's job
            if lacking is None and saved.config_digest == d:
                chain, why = saved, (f"saved rules version {new.version} ({new.source}) kept: "
                                     f"the config's rules are unchanged since it was read")
            elif lacking is None and config_mtime_ms <= new.rules.updated_ms:
                chain = replace(saved, config_digest=d)
                why = (f"saved rules version {new.version} ({new.source}) kept: it is newer "
                       f"than the config file, whose rules differ")
            else:
                chain = append(saved, config_rules, "config", now_ms, margin, d)
                why = (f"the config's rules are newer than saved version {new.version}: "
                       f"version {chain.newest.version}, activation at "
                       f"{chain.newest.activation_ms} ms")
                if lacking is not None:
                    why = f"{lacking}; {why}"
        save(chain, data_dir)
    return chain, why


def publish(stats: Any, chain: Chain, changed: bool) -> None:
    """Tell the workers (after the file is renamed, still holding the lock): the newest
    version and its activation in the stats file's header (an m3shm.stats.StatsFile)."""
    from m3shm import stats as st

    stats.set_header(st.H_RULES_ACTIVATION_MS, chain.newest.activation_ms)
    stats.set_header(st.H_RULES_VERSION, chain.newest.version)
    if changed:
        stats.set_header(st.H_RULES_CHANGES, stats.header(st.H_RULES_CHANGES) + 1)
