"""Hypothesis profiles: a fixed budget in CI, a long run by hand (HYPOTHESIS_PROFILE=long)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW_EXAMPLES = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]

# Each example is a real backup, restore and drill (~0.3 s on an idle 2-core machine): a
# fixed count keeps CI well within a minute, even on a loaded one.
settings.register_profile(
    "ci", max_examples=80, deadline=None, suppress_health_check=_SLOW_EXAMPLES, print_blob=True
)
# The hand run: about ten minutes on an idle 2-core machine.
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=_SLOW_EXAMPLES, print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
