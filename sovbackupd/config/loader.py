"""Load a policy from YAML, apply the seed's environment overrides, render every error."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sovbackupd.config.models import RSYNC_URL_PATTERN, Policy
from sovbackupd.errors import ConfigError

DEFAULT_PATH = Path("/etc/sovbackupd/policy.yaml")
CONFIG_ENV = "SOVBACKUPD_CONFIG"
SEED_DAILY_SCHEDULE = "0 2 * * *"  # the seed's crontab line for daily backups
ENV_REMOTE_NAME = "remote"  # the rsync remote that REMOTE_BACKUP_PATH adds or points

Location = tuple[str | int, ...]


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. In YAML 1.1 the key ``on:`` (of notify) is True."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def default_path() -> Path:
    """Return the policy path from $SOVBACKUPD_CONFIG, else the system default."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_PATH)


def _key_lines(node: yaml.Node, location: Location, lines: dict[Location, int]) -> None:
    lines.setdefault(location, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*location, str(key_node.value))
            lines[child] = key_node.start_mark.line + 1
            _key_lines(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _key_lines(item, (*location, index), lines)


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Apply the seed's environment variables to *data*; return the problems found."""
    problems: list[str] = []
    if backup_dir := environ.get("BACKUP_DIR"):
        if Path(backup_dir).is_absolute():
            data["backup_dir"] = backup_dir
        else:  # validated here so the problem names the variable, not a policy line
            problems.append(
                f"BACKUP_DIR (environment): must be an absolute path, not {backup_dir!r}"
            )
    if (retention_days := environ.get("RETENTION_DAYS")) is not None:
        if retention_days.isascii() and retention_days.isdigit():  # str.isdigit takes "²"
            tiers = data.setdefault("tiers", {})
            if isinstance(tiers, dict):
                daily = tiers.get("daily") or {"schedule": SEED_DAILY_SCHEDULE}
                if isinstance(daily, dict):  # anything else is reported by validation
                    tiers["daily"] = {**daily, "keep": int(retention_days)}
        else:
            problems.append(
                f"RETENTION_DAYS (environment): must be a whole number of days, "
                f"not {retention_days!r}"
            )
    if remote_path := environ.get("REMOTE_BACKUP_PATH"):
        problems.extend(_apply_remote_path(data, remote_path))
    return problems


def _apply_remote_path(data: dict[str, Any], url: str) -> list[str]:
    """Point the rsync remote named ENV_REMOTE_NAME at *url*, adding it when missing."""
    if not re.fullmatch(RSYNC_URL_PATTERN, url):
        return [f"REMOTE_BACKUP_PATH (environment): must be user@host:/path, not {url!r}"]
    remotes = data.setdefault("remotes", [])
    if not isinstance(remotes, list):
        return []  # reported by validation
    for index, remote in enumerate(remotes):
        if isinstance(remote, dict) and remote.get("name") == ENV_REMOTE_NAME:
            if remote.get("type") != "rsync":
                return [
                    f"REMOTE_BACKUP_PATH (environment): the policy's remote "
                    f"{ENV_REMOTE_NAME!r} is not an rsync remote, so it cannot take the url"
                ]
            remotes[index] = {**remote, "url": url}
            return []
    remotes.append({"name": ENV_REMOTE_NAME, "type": "rsync", "url": url})
    return []


def _child(container: object, key: str | int) -> tuple[bool, object]:
    """Return whether *container* has *key*, and the value there."""
    if isinstance(container, dict):
        return key in container, container.get(key)
    if isinstance(container, list) and isinstance(key, int) and 0 <= key < len(container):
        return True, container[key]
    return False, None


def _readable_location(location: Location, data: object) -> Location:
    """Drop pydantic's union-branch names from *location*, keeping real keys and indexes."""
    kept: list[str | int] = []
    current = data
    for position, part in enumerate(location):
        present, child = _child(current, part)
        if present:
            current = child
        elif position == len(location) - 1 and isinstance(current, dict):
            current = None  # a missing or unknown key: still worth naming
        else:
            continue  # a union branch's name, not a key of the document
        kept.append(part)
    return tuple(kept)


def _dotted(location: Location) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def _line_of(location: Location, lines: dict[Location, int]) -> int | None:
    for end in range(len(location), -1, -1):
        if (line := lines.get(location[:end])) is not None:
            return line
    return None


def _problems(
    error: ValidationError, data: object, lines: dict[Location, int], source: str
) -> list[str]:
    problems: list[tuple[int, str]] = []
    for detail in error.errors():
        location = _readable_location(tuple(detail["loc"]), data)
        if detail["type"] == "extra_forbidden":
            message = "unknown key"
        elif detail["type"] == "missing":
            message = "required key is missing"
        else:
            message = detail["msg"].removeprefix("Value error, ")
        line = _line_of(location, lines)
        where = f"{source}:{line}" if line is not None else source
        problems.append((line or 0, f"{where}: {_dotted(location)}: {message}"))
    return [text for _, text in sorted(problems, key=lambda problem: problem[0])]


def parse(text: str, source: str, environ: Mapping[str, str]) -> Policy:
    """Validate policy *text* (named *source* in errors), with *environ*'s overrides."""
    try:
        root = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from error
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the policy must be a mapping of keys to values")
    lines: dict[Location, int] = {}
    if root is not None:
        _key_lines(root, (), lines)
    problems = _apply_environment(data, environ)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as error:
        problems.extend(_problems(error, data, lines, source))
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise ConfigError(f"{source}: invalid policy ({count}): {problems[0]}", tuple(problems))
    return policy


def load(path: Path, environ: Mapping[str, str] | None = None) -> Policy:
    """Read and validate the policy file at *path*; raise ConfigError naming every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise ConfigError(
            f"policy file {path} not found (set --config or ${CONFIG_ENV})"
        ) from error
    except OSError as error:
        raise ConfigError(f"policy file {path} cannot be read: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"policy file {path} is not UTF-8 text") from error
    return parse(text, str(path), os.environ if environ is None else environ)


def render(policy: Policy) -> str:
    """Return the effective policy as YAML."""
    return yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False)
