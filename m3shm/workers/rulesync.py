"""A worker's copy of the rule-set versions, kept in step with ``<data>/rules.json``.

The worker loads the chain before it serves, then its heartbeat compares the stats header's
rules version with the newest it installed; when the header is ahead it re-reads the file and
installs every newer version, oldest first: it compiles it (m3shm.rules.matcher) and hands it
to the installer (``Aggregator.install_rules(compiled, version, activation_ms)``), which keeps
applying the older plans to windows that start before the activation. The activation time is
read from the file, never computed here, so every worker switches at the same boundary. The
version and activation it installed go into its block of the stats file
(W_RULES_VERSION, W_RULES_ACTIVATION_MS) and into ``GET /api/v1/rules``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from m3shm import stats as st
from m3shm.rules import versions
from m3shm.rules.matcher import CompiledRules

log = logging.getLogger("m3shm.rules")

Installer = Callable[[CompiledRules, int, int], None]


class RuleSync:
    def __init__(self, data_dir: str, statsfile: st.StatsFile, ws: st.WorkerStats,
                 index: int) -> None:
        self.data_dir = data_dir
        self.statsfile = statsfile
        self.ws = ws
        self.index = index
        self.installed: list[tuple[versions.Version, CompiledRules]] = []
        self.config_digest = ""
        self._installer: Installer | None = None
        self._failed_at = 0      # header version whose file could not be read (no retry spin)

    @property
    def version(self) -> int:
        return self.installed[-1][0].version if self.installed else 0

    @property
    def newest(self) -> versions.Version | None:
        return self.installed[-1][0] if self.installed else None

    def chain(self, now_ms: int) -> list[versions.Version]:
        """The installed versions any window starting at or after ``now_ms`` uses."""
        vs = [v for v, _ in self.installed]
        cur = 0
        for i, v in enumerate(vs):
            if v.activation_ms <= now_ms:
                cur = i
        return vs[cur:]

    def compiled(self, version: int) -> CompiledRules | None:
        for v, c in self.installed:
            if v.version == version:
                return c
        return None

    def attach(self, installer: Installer) -> None:
        """Route installs to ``installer`` (the worker's Aggregator), replaying every version
        installed so far, oldest first."""
        self._installer = installer
        for v, c in self.installed:
            installer(c, v.version, v.activation_ms)

    def check(self, force: bool = False) -> bool:
        """Install the versions newer than ours if the header says there are; True if any."""
        want = self.statsfile.header(st.H_RULES_VERSION)
        if not force and (want <= self.version or want == self._failed_at):
            return False
        try:
            chain = versions.load(self.data_dir)
        except (OSError, ValueError) as e:   # RuleError is a ValueError
            log.error("worker %d: cannot read the rules (version %d): %s", self.index, want, e)
            self._failed_at = want
            return False
        if chain is None:
            return False
        self.config_digest = chain.config_digest
        got = False
        for v in chain.versions:
            if v.version <= self.version:
                continue
            try:
                c = CompiledRules(v.rules)
                if self._installer is not None:
                    self._installer(c, v.version, v.activation_ms)
            except Exception:  # noqa: BLE001 - keep the versions installed; say so once
                log.exception("worker %d: installing rules version %d failed", self.index,
                              v.version)
                self._failed_at = want
                break
            self.installed.append((v, c))
            got = True
            log.info("worker %d: rules version %d installed (%s), activation at %d ms",
                     self.index, v.version, v.source, v.activation_ms)
        if got:
            self.prune(int(time.time() * 1000))
            newest = self.installed[-1][0]
            self.ws.set(st.W_RULES_ACTIVATION_MS, newest.activation_ms)
            self.ws.set(st.W_RULES_VERSION, newest.version)
        return got

    def prune(self, now_ms: int) -> None:
        """Forget compiled versions no window starting at or after ``now_ms`` uses."""
        keep = {v.version for v in self.chain(now_ms)}
        self.installed = [(v, c) for v, c in self.installed if v.version in keep]
