"""Errors of the PromQL engine: every failure a user can cause is a :class:`QueryError`."""

from __future__ import annotations


class QueryError(Exception):
    """A query that cannot be evaluated (bad argument, many-to-many match, ...)."""


class QueryLimitError(QueryError):
    """A query that would exceed a limit (samples, series) and was stopped before it did."""


class QueryCanceledError(QueryError):
    """The client went away (or asked to stop); the query was stopped between two steps."""


class QueryTimeoutError(QueryError):
    """The query ran past its timeout and was stopped between two steps."""
