"""The policy: pydantic models, YAML loading and error rendering."""

from sovbackupd.config.loader import default_path, load, parse, render
from sovbackupd.config.models import Policy

__all__ = ["Policy", "default_path", "load", "parse", "render"]
