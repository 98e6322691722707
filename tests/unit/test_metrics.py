"""The metrics module keeps its series honest across reloads."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from sovbackupd.metrics import Metrics


def test_reload_that_drops_a_tier_removes_its_next_run_series() -> None:
    """A tier no longer scheduled stops reporting a next run that would look missed."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.declare_tiers(["hourly", "daily"])
    metrics.next_run.labels(tier="hourly").set(100)
    metrics.declare_tiers(["daily"])
    name = "sovbackupd_next_run_timestamp_seconds"
    assert registry.get_sample_value(name, {"tier": "hourly"}) is None
    assert registry.get_sample_value(name, {"tier": "daily"}) == 0


def test_every_labelled_series_exists_before_anything_happens() -> None:
    """Result and location series are there at zero from the start."""
    registry = CollectorRegistry()
    Metrics(registry).declare_tiers(["daily"])
    assert registry.get_sample_value("sovbackupd_backups_total", {"result": "failure"}) == 0
    assert registry.get_sample_value("sovbackupd_backups_stored", {"location": "local"}) == 0
    assert (
        registry.get_sample_value("sovbackupd_last_success_timestamp_seconds", {"tier": "daily"})
        == 0
    )
