"""One storage namespace as a worker runs it: its shared segment, commit log and pipeline.

Every namespace of ``cfg.namespaces`` (the raw one and each aggregated one) has

- its own segment (the supervisor creates them all before forking: :func:`segment_path`),
  with the same shards, producers and lane size, that namespace's block size and write window,
  and ``ns_id`` = its index in ``cfg.namespaces``;
- its own commit-log directory (:func:`commitlog_dir`: ``<data>/commitlog/`` for the raw one,
  ``<data>/commitlog-<name>/`` for the others), with this worker's files in it, replayed into
  that segment only;
- its own flush state (``<data>/flush/state-w<i>.json`` raw, ``state-<name>-w<i>.json``
  otherwise), filesets under ``<data>/filesets/<name>/``, blocks of its own size and its own
  retention.

A worker owns the same shard range in every segment and its drain thread drains them all.
Writing into a namespace: ``await w.ns[name].pipeline.submit(batch, length, nrecords)`` with
lane records (m3shm/storage/records.py builds them from rows): each record goes to the owner
of its shard in *that* segment, durable in that namespace's commit log before submit returns.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from m3shm.config import NamespaceConfig

if TYPE_CHECKING:
    from m3shm.shm import Segment
    from m3shm.storage.commitlog import CommitLog
    from m3shm.workers.ingest import IngestPipeline

RAW_COMMITLOG = "commitlog"


def commitlog_dir(data_dir: str, ns: NamespaceConfig) -> str:
    """The namespace's commit-log directory (the raw one keeps its historical name)."""
    if not ns.aggregated:
        return os.path.join(data_dir, RAW_COMMITLOG)
    return os.path.join(data_dir, f"{RAW_COMMITLOG}-{ns.name}")


def all_commitlog_dirs(data_dir: str) -> list[str]:
    """Every commit-log directory present in the data directory (configured or not)."""
    try:
        names = os.listdir(data_dir)
    except FileNotFoundError:
        return []
    return [os.path.join(data_dir, n) for n in sorted(names)
            if n == RAW_COMMITLOG or n.startswith(RAW_COMMITLOG + "-")]


def state_key(ns: NamespaceConfig) -> str | None:
    """How flush state files name the namespace: None for the raw one (its historical
    names), else its name."""
    return ns.name if ns.aggregated else None


def _seg_hash(data: str) -> str:
    return hashlib.sha1(os.path.realpath(data).encode()).hexdigest()[:12]


def segment_path(data: str, ns: NamespaceConfig | None = None) -> str:
    """The raw namespace's segment ``/dev/shm/m3shm-<hash>.seg`` (``ns`` None or raw), or an
    aggregated one's ``/dev/shm/m3shm-<hash>-ns-<name>.seg``."""
    h = _seg_hash(data)
    if ns is None or not ns.aggregated:
        return f"/dev/shm/m3shm-{h}.seg"
    return f"/dev/shm/m3shm-{h}-ns-{ns.name}.seg"


def aggregated_segment_glob(data: str) -> str:
    """A glob matching every aggregated namespace's segment of this data directory."""
    return f"/dev/shm/m3shm-{_seg_hash(data)}-ns-*.seg"


@dataclass
class NsRuntime:
    """A namespace in a worker. ``clog`` and ``pipeline`` are set once the worker's event
    loop runs (the raw entry shares them with ``Worker.clog`` / ``Worker.pipeline``)."""

    name: str
    id: int                          # index in cfg.namespaces (= the segment's ns_id)
    cfg: NamespaceConfig
    seg: Segment
    cl_dir: str
    clog: CommitLog | None = None
    pipeline: IngestPipeline | None = None

    @property
    def aggregated(self) -> bool:
        return self.cfg.aggregated

    @property
    def key(self) -> str | None:
        return state_key(self.cfg)
