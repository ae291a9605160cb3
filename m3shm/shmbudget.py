"""What the daemon's shared-memory files need of /dev/shm, checked once at start.

Every namespace has a segment (m3shm/shm.py) and an aggregation store beside it
(m3shm/aggstore.py). Both are sparse files: ``ftruncate`` reserves their size, and tmpfs
allocates a page only when it is first touched. Two parts differ in how they grow:

- the *fixed* part: segment header and doorbells, the lanes (rings: every page is touched as
  soon as traffic has gone round once), each shard's header, series hash table and series
  slots, each store shard's plan table and spill rows. Its pages are touched by plain stores
  as series come, so /dev/shm must be able to hold all of it: running out there would kill a
  worker with SIGBUS;
- the *arenas* (per shard: labels and open-block chunks, ``shm.arena_bytes`` /
  ``shm.agg_arena_bytes``; downsampling cells, ``shm.cell_arena_bytes``). Their bump
  allocators commit pages a step at a time (ARENA_COMMIT_STEP, csrc/arena.c arena_commit,
  with MADV_POPULATE_WRITE), so a full /dev/shm makes a shard refuse samples ("out of memory:
  /dev/shm is full") like a full arena does, nothing crashes.

So the start-up check refuses only when /dev/shm cannot hold the *working set*: the fixed
part plus one commit step of every arena (enough to store anything at all); when it cannot
hold the whole reservation it logs a warning with both figures. docs/sizing.md has the rule
and the numbers at the defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from m3shm._native import lib
from m3shm.config import ConfigError

COMMIT_STEP = 1 << 20  # csrc/seg_int.h ARENA_COMMIT_STEP


@dataclass
class Budget:
    """Bytes of /dev/shm, summed over the files of every namespace."""

    reserved: int = 0  # the files' sizes (address space)
    fixed: int = 0     # lanes, tables, slots, headers: all of it may be touched
    arenas: int = 0    # shard arenas and cell arenas, committed step by step
    first_steps: int = 0  # one commit step of every arena

    @property
    def working(self) -> int:
        """What /dev/shm must be able to hold for the daemon to start."""
        return self.fixed + self.first_steps

    def add_segment(self, size: int, num_shards: int, arena_bytes: int) -> None:
        arenas = num_shards * arena_bytes
        self.reserved += size
        self.arenas += arenas
        self.fixed += size - arenas
        self.first_steps += num_shards * min(COMMIT_STEP, arena_bytes)

    def describe(self) -> str:
        mib = 1 << 20
        return (f"{self.reserved // mib} MiB reserved: {self.fixed // mib} MiB of lanes, series "
                f"and plan tables (all may be touched) + {self.arenas // mib} MiB of arenas "
                f"(allocated {COMMIT_STEP // mib} MiB at a time as data comes)")


def of_segments(segs: list, cell_arena: int) -> Budget:
    """The budget of these segments (m3shm.shm.Segment) and their aggregation stores."""
    b = Budget()
    for seg in segs:
        p = seg.params
        b.add_segment(p.size(), p.num_shards, p.arena_bytes)
        store = int(lib.m3_aggst_size(seg.base, cell_arena))
        b.add_segment(store, p.num_shards, cell_arena)
    return b


def check(b: Budget, directory: str) -> str | None:
    """Raise ConfigError if ``directory`` (/dev/shm) cannot hold the working set; return a
    warning if it cannot hold the whole reservation; else None."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    mib = 1 << 20
    if free < b.working:
        raise ConfigError(
            f"shm: the shared-memory files need at least {b.working // mib} MiB of "
            f"{directory} ({b.describe()}; the working set is the tables plus "
            f"{COMMIT_STEP // mib} MiB of every arena) but it has {free // mib} MiB free; lower "
            "shm.series_per_shard / shm.agg_series_per_shard / shm.lane_bytes / shards or "
            f"enlarge {directory} (docs/sizing.md)")
    if free < b.reserved:
        return (f"{directory} has {free // mib} MiB free, less than the {b.describe()}: shards "
                "will refuse samples as out of memory once it fills, before their arenas do "
                "(docs/sizing.md)")
    return None
