"""Shared test configuration.

Hypothesis profiles are chosen by ``HYPOTHESIS_PROFILE``: ``quick`` (default, for the edit-test
loop), ``ci`` (what `.ci/run` uses) and ``thorough`` (on demand).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("quick", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))
