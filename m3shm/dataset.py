"""Reader for series in VictoriaMetrics' JSON-lines export format.

One series per line: ``{"metric": {labels}, "values": [...], "timestamps": [...]}``, gzip'd or
not. The project's reference data (``../shared/data/real-10s.jsonl.gz``) uses it, and so does
m3shm's ``/api/v1/export``. NaN appears as the bare token ``NaN``, which Python's json reads.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DATASET = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / \
    "real-10s.jsonl.gz"


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    timestamps: np.ndarray  # int64 milliseconds
    values: np.ndarray  # float64


def default_dataset() -> Path:
    """``$M3SHM_DATASET`` if set, else the shared real-10s dataset beside the repository."""
    return Path(os.environ.get("M3SHM_DATASET", DEFAULT_DATASET))


def read_export(path: str | os.PathLike[str]) -> Iterator[Series]:
    """Yield every series of an export file (``.gz`` is decompressed)."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                ts = np.asarray(obj["timestamps"], dtype=np.int64)
                vs = np.asarray(obj["values"], dtype=np.float64)
                labels = {str(k): str(v) for k, v in obj["metric"].items()}
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{p}:{lineno}: not a series in export format: {e}") from e
            if ts.shape != vs.shape:
                raise ValueError(f"{p}:{lineno}: {len(ts)} timestamps but {len(vs)} values")
            yield Series(labels, ts, vs)
