"""Finalise watermarks: how far each worker's finalise rounds got, for the replay after a full
restart (docs/rules.md, "Wiring plan" items 3 and 5). No numpy here: the supervisor reads them
before it forks.

Each Aggregator writes ``<data>/downsample/finalised-<prefix>w<i>.json`` (``{"now_ms": T}``)
after a complete finalise round at T: every window final at T was written (points) or
forwarded (rollup inputs). After a full restart the replay takes the oldest of them, W, as its
``now``: windows final at W count as late, every later one is re-aggregated from the replayed
raw samples and forwarded again; so a group owner replaying its namespace's ROLLUP_IN records
keeps only the rows of input windows final at W (m3_aggst_replay_mode). Every worker must use
the same W, but the first of them to finish its replay writes new marks while the others may
still be reading: so the supervisor fixes W once per boot (:func:`fix_replay_watermark`, in
``replay-now.json``) before it starts any worker, and workers read that
(:func:`replay_watermark`).
"""

from __future__ import annotations

import json
import os

from m3shm.atomicfile import replace_json

WATERMARK_DIR = "downsample"
REPLAY_FILE = "replay-now.json"


def watermark_path(data_dir: str, index: int, prefix: str = "") -> str:
    return os.path.join(data_dir, WATERMARK_DIR, f"finalised-{prefix}w{index}.json")


def read_watermark(data_dir: str) -> int:
    """The oldest finalise watermark of any worker (0 if none was written)."""
    d = os.path.join(data_dir, WATERMARK_DIR)
    marks = []
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith("finalised-") and name.endswith(".json"):
            try:
                with open(os.path.join(d, name)) as f:
                    marks.append(int(json.load(f)["now_ms"]))
            except (OSError, ValueError, KeyError, TypeError):
                return 0  # unreadable: re-aggregate everything replayed (repeats, loses none)
    return min(marks) if marks else 0


def _write_json(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    replace_json(path, doc)


def fix_replay_watermark(data_dir: str, boot: int) -> int:
    """Supervisor, before forking the workers of ``boot``: the replay watermark of this boot,
    computed once (a file of this boot already there is kept: the supervisor restarted)."""
    path = os.path.join(data_dir, WATERMARK_DIR, REPLAY_FILE)
    try:
        with open(path) as f:
            doc = json.load(f)
        if int(doc["boot"]) == boot:
            return int(doc["now_ms"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    w = read_watermark(data_dir)
    _write_json(path, {"boot": boot, "now_ms": w})
    return w


def replay_watermark(data_dir: str, boot: int) -> int:
    """Worker: the replay watermark its supervisor fixed for ``boot`` (else the oldest mark)."""
    try:
        with open(os.path.join(data_dir, WATERMARK_DIR, REPLAY_FILE)) as f:
            doc = json.load(f)
        if int(doc["boot"]) == boot:
            return int(doc["now_ms"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return read_watermark(data_dir)
