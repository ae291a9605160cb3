"""One running query's limits, counters and stop flag, shared by the storage and the engine.

The HTTP side creates a :class:`QueryContext` per query; the storage sources charge what a
selection will cost (:meth:`QueryContext.admit`) *before* they copy or decode anything, and
the engine and the sources call :meth:`QueryContext.check` between series batches, shards and
AST nodes. A check raises when the client has gone away (``cancel()``, set from the event
loop) or the deadline passed, so a query stops within one step of either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from m3shm.query.errors import QueryCanceledError, QueryLimitError, QueryTimeoutError


@dataclass(frozen=True)
class QueryLimits:
    """Per-query limits; 0 means unlimited. Names are those of config.py's ``query:``."""

    max_series: int = 0  # series fetched, summed over the query's selectors
    max_samples: int = 0  # samples decoded, summed over the query's selectors
    max_bytes: int = 0  # estimated memory of the fetched blocks and decoded samples


BYTES_PER_SAMPLE = 40  # decoded ts + value + series tag + the engine's temporaries (approx.)


@dataclass
class QueryContext:
    expr: str = ""
    limits: QueryLimits = field(default_factory=QueryLimits)
    deadline: float | None = None  # time.monotonic() value
    timeout_s: float = 0.0
    started: float = field(default_factory=time.time)
    series: int = 0
    samples: int = 0
    bytes: int = 0
    cancelled: bool = False
    warnings: list[str] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled = True

    def check(self) -> None:
        if self.cancelled:
            raise QueryCanceledError("query canceled: the client closed the connection")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise QueryTimeoutError(f"query timed out in query execution (timeout "
                                    f"{self.timeout_s:g}s)")

    def admit(self, series: int, samples: int, block_bytes: int) -> None:
        """Charge a selection before it is read; raises QueryLimitError naming the limit."""
        self.check()
        lim = self.limits
        nbytes = block_bytes + samples * BYTES_PER_SAMPLE
        if lim.max_series and self.series + series > lim.max_series:
            raise QueryLimitError(f"query would fetch {self.series + series} series, more than "
                                  f"query.max_series={lim.max_series}")
        if lim.max_samples and self.samples + samples > lim.max_samples:
            raise QueryLimitError(f"query would decode {self.samples + samples} samples, more "
                                  f"than query.max_samples={lim.max_samples}")
        if lim.max_bytes and self.bytes + nbytes > lim.max_bytes:
            raise QueryLimitError(f"query would use about {self.bytes + nbytes} bytes of "
                                  f"memory, more than query.max_bytes={lim.max_bytes}")
        self.series += series
        self.samples += samples
        self.bytes += nbytes
