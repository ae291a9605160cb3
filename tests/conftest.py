"""Shared test configuration.

Hypothesis profiles are chosen by ``HYPOTHESIS_PROFILE``: ``quick`` (default, for the edit-test
loop), ``ci`` (what `.ci/run` uses) and ``thorough`` (on demand).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("quick", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


@pytest.fixture(autouse=True)
def _reap_daemons():
    """A daemon a test started and did not stop (it failed first) is killed with its workers
    and its shared memory removed, so it cannot load the machine for the tests after it.
    Daemons already running when the test began belong to wider-scoped fixtures: their own
    teardown stops them (and the session-wide reaper below catches what that misses)."""
    from test_daemon_harness import RUNNING

    before = set(RUNNING)
    yield
    for d in list(RUNNING - before):
        d.reap()


@pytest.fixture(autouse=True, scope="session")
def _reap_daemons_at_exit():
    yield
    from test_daemon_harness import RUNNING

    for d in list(RUNNING):
        d.reap()
