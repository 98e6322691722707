"""The shipped example policy and the configuration reference follow the models."""

from __future__ import annotations

from pathlib import Path

import pytest

from sovbackupd import config
from sovbackupd.config import reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("relative", sorted(reference.GENERATED, key=str))
def test_generated_file_matches_the_models(relative: Path) -> None:
    """Regenerate with `python -m sovbackupd.config.reference` when this fails."""
    assert (ROOT / relative).read_text() == reference.GENERATED[relative]()


def test_example_policy_is_valid_and_means_the_example() -> None:
    """The example policy file parses back to exactly the example model."""
    text = (ROOT / "config" / "policy.example.yaml").read_text()
    assert config.parse(text, "policy.example.yaml", {}) == reference.EXAMPLE
