"""PromQL evaluation over the block stream: see engine.py and README.md beside it."""

from m3shm.query.engine import Engine, Limits, Result, Sample, Series, Stats
from m3shm.query.errors import QueryError, QueryLimitError
from m3shm.query.storage import Block, Encoding, MemoryStore, SelectResult, SeriesBlocks, Storage

__all__ = ["Block", "Encoding", "Engine", "Limits", "MemoryStore", "QueryError",
           "QueryLimitError", "Result", "Sample", "SelectResult", "Series", "SeriesBlocks",
           "Stats", "Storage"]
