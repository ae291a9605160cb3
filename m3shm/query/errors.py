"""Errors of the PromQL engine: every failure a user can cause is a :class:`QueryError`."""

from __future__ import annotations


class QueryError(Exception):
    """A query that cannot be evaluated (bad argument, many-to-many match, ...)."""


class QueryLimitError(QueryError):
    """A query that would exceed a limit (samples, series) and was stopped before it did."""
