"""Shared pytest set-up."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# The suite runs on 2 shared cores; hypothesis' timing health checks would flake there.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("ci")
