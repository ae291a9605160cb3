"""The one place where the C core's integer error codes become Python exceptions.

Every call into ``m3shm._core`` that can fail goes through :func:`check`, which raises the
exception class mapped to the code, with the caller's context (what was being done, on which
input) in the message. New C error codes get a line in ``_BY_CODE`` and nowhere else.
"""

from __future__ import annotations

from m3shm._native import lib


class M3shmError(Exception):
    """Base class of every error m3shm raises on purpose."""

    code: int = 0


class InvalidArgumentError(M3shmError, ValueError):
    """The caller passed something the C core cannot take (NULL, wrong length, bad option)."""


class BufferFullError(M3shmError):
    """The destination buffer has no room; nothing was written."""


class OutOfOrderError(M3shmError, ValueError):
    """A timestamp not greater than the previous one in an append-only stream."""


class CorruptError(M3shmError, ValueError):
    """Input bytes are not a valid encoding (a decoder of untrusted bytes said so)."""


class TruncatedError(CorruptError):
    """Input bytes end before the encoding does."""


class VersionError(CorruptError):
    """An encoding or layout version this build does not know."""


class OutOfRangeError(M3shmError, ValueError):
    """A value outside what the format can hold."""


class NoSuchSeriesError(M3shmError, LookupError):
    """No such series: the slot is free, or the series expired and the slot was reused."""


_BY_CODE: dict[int, type[M3shmError]] = {
    lib.M3_EINVAL: InvalidArgumentError,
    lib.M3_ENOSPC: BufferFullError,
    lib.M3_EORDER: OutOfOrderError,
    lib.M3_ECORRUPT: CorruptError,
    lib.M3_ETRUNC: TruncatedError,
    lib.M3_EVERSION: VersionError,
    lib.M3_ERANGE: OutOfRangeError,
    lib.M3_ENOENT: NoSuchSeriesError,
}


def error_for(code: int, context: str) -> M3shmError:
    """The exception for a negative C return code, with ``context`` as its message."""
    cls = _BY_CODE.get(code, M3shmError)
    err = cls(f"{context} ({cls.__name__}, code {code})")
    err.code = code
    return err


def check(code: int, context: str) -> int:
    """Return ``code`` if it is not an error, else raise the mapped exception."""
    if code < 0:
        raise error_for(code, context)
    return code
