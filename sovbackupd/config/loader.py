"""Load a policy from YAML, apply the seed's environment overrides, render every error."""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import yaml
from pydantic import ValidationError
from yaml._yaml import CParser  # libyaml, which PyYAML's wheels carry

from sovbackupd.config import files, layout
from sovbackupd.config.files import Location
from sovbackupd.config.models import MAX_KEEP, PATTERN_EXPECTATIONS, RSYNC_URL_PATTERN, Policy
from sovbackupd.errors import ConfigError

DEFAULT_PATH = Path("/etc/sovbackupd/policy.yaml")
CONFIG_ENV = "SOVBACKUPD_CONFIG"
SEED_DAILY_SCHEDULE = "0 2 * * *"  # the seed's crontab line for daily backups
ENV_REMOTE_NAME = "remote"  # the rsync remote that REMOTE_BACKUP_PATH adds or points
Problem = tuple[int | None, Location, str]  # a problem's line (when known), key and message


# Bounds on what a policy file may hold. A real policy is a few KiB, five levels deep, a
# few hundred nodes; these leave room for hundreds of sources and hooks, and keep a hostile
# file from costing more than a few MiB and milliseconds to refuse.
MAX_POLICY_BYTES = 256 << 10
MAX_DEPTH = 32
MAX_NODES = 10_000
MAX_SCALAR_CHARS = 16 << 10
MAX_NUMBER_CHARS = 32  # int() refuses over 4300 digits, and no policy number needs 32
_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a policy must not contain, or too much of it."""


class _Loader(
    yaml.composer.Composer, CParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver
):
    """A safe loader for policies: bounded, plain YAML, and YAML 1.2 booleans.

    libyaml scans and parses (its C scanner costs a few milliseconds where the pure-Python
    one takes seconds on deep or long input, and it caps flow nesting itself); the
    composer is PyYAML's Python one, so that every event is checked before a node is
    built from it. Anchors, aliases and explicit tags are refused: aliases are how a few
    hundred bytes expand into gigabytes (the "billion laughs"), and a policy needs
    neither. Nesting depth, node count and scalar length are capped for the same reason.
    Only true/false are booleans: in YAML 1.1 the key ``on:`` (of notify) is True.
    """

    def __init__(self, stream: str) -> None:
        """Read the policy document *stream*."""
        CParser.__init__(self, stream)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        yaml.composer.Composer.__init__(self)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        """Compose one node, refusing what a policy must not contain before it is built."""
        event = cast(yaml.Event, self.peek_event())  # the composer asks only inside a document
        mark = event.start_mark
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _refusal("anchors and aliases (&name, *name) are not allowed", mark)
        if (tag := getattr(event, "tag", None)) not in (None, "!"):
            raise _refusal(f"explicit tags ({tag}) are not allowed", mark)
        if isinstance(event, yaml.ScalarEvent):
            if len(event.value) > MAX_SCALAR_CHARS:
                raise _refusal(f"a value longer than {MAX_SCALAR_CHARS} characters", mark)
            if "\0" in event.value:
                # Only a "\0" escape makes one; no path, argv or address may hold it.
                raise _refusal("NUL characters (\\0) are not allowed", mark)
            resolved = self.resolve(yaml.ScalarNode, event.value, event.implicit)  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            if resolved == "tag:yaml.org,2002:merge":
                # Merged keys come before the mapping's own: a repeat would name the wrong line.
                raise _refusal("merge keys (<<) are not allowed", mark)
            if resolved in _NUMBER_TAGS and len(event.value) > MAX_NUMBER_CHARS:
                raise _refusal(f"a number longer than {MAX_NUMBER_CHARS} characters", mark)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _refusal(f"more than {MAX_NODES} values", mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _refusal(f"nesting deeper than {MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> object:
        """Build *node*; a scalar Python cannot convert (2026-13-45) is a YAML error."""
        try:
            return super().construct_object(node, deep)
        except ValueError as error:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {str(node.value)[:40]!r}: {error}", node.start_mark
            ) from error


def _refusal(problem: str, mark: object) -> _Refused:
    # libyaml's marks have the line and column of yaml.error.Mark, which the stubs expect.
    return _Refused(None, None, f"{problem} in a policy", cast(yaml.error.Mark, mark))


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def default_path() -> Path:
    """Return the policy path from $SOVBACKUPD_CONFIG, else the system default."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_PATH)


def _index(
    node: yaml.Node, location: Location, lines: dict[Location, int], twice: list[Problem]
) -> None:
    """Record the line of every key under *node*; add each key set twice to *twice*.

    Recursive: the loader has already bounded the depth.
    """
    lines.setdefault(location, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*location, str(key_node.value))
            line = key_node.start_mark.line + 1
            if child in lines:
                # YAML would silently take the last value; the first keeps its line.
                twice.append((line, child, f"set twice: line {lines[child]} sets it first"))
                continue
            lines[child] = line
            _index(value_node, child, lines, twice)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index(item, (*location, index), lines, twice)


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Apply the seed's environment variables to *data*; return the problems found."""
    problems: list[str] = []
    if backup_dir := environ.get("BACKUP_DIR"):
        # Validated here so that a problem names the variable, not a policy line.
        if not Path(backup_dir).is_absolute():
            problems.append(
                f"BACKUP_DIR (environment): must be an absolute path, not {backup_dir!r}"
            )
        elif (refusal := layout.backup_dir_refusal(Path(backup_dir))) is not None:
            problems.append(f"BACKUP_DIR (environment): {refusal}")
        else:
            data["backup_dir"] = backup_dir
    if (retention_days := environ.get("RETENTION_DAYS")) is not None:
        if not (retention_days.isascii() and retention_days.isdigit()):  # isdigit takes "²"
            problems.append(
                f"RETENTION_DAYS (environment): must be a whole number of days, "
                f"not {retention_days!r}"
            )
        elif len(digits := retention_days.lstrip("0")) > len(str(MAX_KEEP)) or (
            int(digits or "0") > MAX_KEEP  # short enough for int() now
        ):
            shown = retention_days if len(retention_days) <= 20 else retention_days[:20] + "..."
            problems.append(
                f"RETENTION_DAYS (environment): must be a whole number of days from 0 to "
                f"{MAX_KEEP}, not {shown!r}"
            )
        else:
            tiers = data.setdefault("tiers", {})
            if isinstance(tiers, dict):
                daily = tiers.get("daily") or {"schedule": SEED_DAILY_SCHEDULE}
                if isinstance(daily, dict):  # anything else is reported by validation
                    tiers["daily"] = {**daily, "keep": int(digits or "0")}
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


def _line_of(location: Location, lines: dict[Location, int]) -> int | None:
    for end in range(len(location), -1, -1):
        if (line := lines.get(location[:end])) is not None:
            return line
    return None


def _validation_problems(error: ValidationError, data: object) -> list[tuple[Location, str]]:
    problems = []
    for detail in error.errors():
        location = _readable_location(tuple(detail["loc"]), data)
        if detail["type"] == "extra_forbidden":
            message = "unknown key"
        elif detail["type"] == "missing":
            message = "required key is missing"
        elif detail["type"] == "string_pattern_mismatch":
            expected = PATTERN_EXPECTATIONS[detail["ctx"]["pattern"]]
            message = f"must be {expected}, not {detail['input']!r}"
        else:
            message = detail["msg"].removeprefix("Value error, ")
        problems.append((location, message))
    return problems


def _rendered(problems: list[Problem], source: str) -> list[str]:
    """Return each problem as ``source:line: key.path: message``, in the order of the file."""
    ordered = sorted(problems, key=lambda problem: problem[0] or 0)
    return [
        f"{source}:{line}: {layout.dotted(location)}: {message}"
        if line is not None
        else f"{source}: {layout.dotted(location)}: {message}"
        for line, location, message in ordered
    ]


def _too_large(source: str) -> ConfigError:
    return ConfigError(f"{source}: the policy is larger than {MAX_POLICY_BYTES >> 10} KiB")


def _document(text: str, source: str) -> tuple[yaml.Node | None, object]:
    """Compose *text* into its node tree and build its data; raise ConfigError if it is bad."""
    if len(text) > MAX_POLICY_BYTES:
        raise _too_large(source)
    try:
        loader = _Loader(text)  # the reader refuses control characters here
        try:
            root = loader.get_single_node()
            return root, (loader.construct_document(root) if root is not None else None)
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as error:
        # A control character: no mark, and str() spans two lines; name its line instead.
        line = text.count("\n", 0, max(error.position, 0)) + 1
        raise ConfigError(
            f"{source}:{line}: not valid YAML: {str(error).splitlines()[0]}"
        ) from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        what = "" if isinstance(error, _Refused) else "not valid YAML: "
        raise ConfigError(f"{where}: {what}{problem}") from error


def parse(
    text: str, source: str, environ: Mapping[str, str], *, check_files: bool = False
) -> Policy:
    """Validate policy *text* (named *source* in errors), with *environ*'s overrides.

    With *check_files*, the files the policy names must exist too, and its layout must
    hold once symlinks are resolved (see :mod:`sovbackupd.config.files`).
    """
    root, data = _document(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the policy must be a mapping of keys to values")
    lines: dict[Location, int] = {}
    found: list[Problem] = []
    if root is not None:
        _index(root, (), lines, found)
    problems = _apply_environment(data, environ)
    keyed: list[tuple[Location, str]] = []
    policy: Policy | None = None
    try:
        policy = Policy.model_validate(data)
    except ValidationError as error:
        keyed = _validation_problems(error, data)
    if policy is not None and check_files:
        keyed = [*files.missing(policy), *files.unrestorable(policy)]
    found.extend((_line_of(location, lines), location, message) for location, message in keyed)
    problems.extend(_rendered(found, source))
    if problems or policy is None:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise ConfigError(f"{source}: invalid policy ({count}): {problems[0]}", tuple(problems))
    return policy


def load(
    path: Path, environ: Mapping[str, str] | None = None, *, check_files: bool = False
) -> Policy:
    """Read and validate the policy file at *path*; raise ConfigError naming every problem.

    With *check_files*, the files the policy names must exist too, and its layout must
    hold once symlinks are resolved.
    """
    try:
        # Non-blocking, so that a FIFO (which blocks an open until a writer comes, and
        # would hang check-config or the daemon's reload) is refused rather than waited on.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(descriptor, "rb") as handle:
            mode = os.fstat(descriptor).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            if not stat.S_ISREG(mode):
                raise ConfigError(f"policy file {path} is not a regular file")
            raw = handle.read(MAX_POLICY_BYTES + 1)
        if len(raw) > MAX_POLICY_BYTES:
            raise _too_large(str(path))
        text = raw.decode("utf-8")
    except FileNotFoundError as error:
        raise ConfigError(
            f"policy file {path} not found (set --config or ${CONFIG_ENV})"
        ) from error
    except OSError as error:
        raise ConfigError(f"policy file {path} cannot be read: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"policy file {path} is not UTF-8 text") from error
    environ = os.environ if environ is None else environ
    return parse(text, str(path), environ, check_files=check_files)


class _Dumper(yaml.SafeDumper):
    """Write values out in full: the loader refuses the aliases PyYAML writes for repeats."""

    def ignore_aliases(self, data: object) -> bool:
        """Never write an alias."""
        del data
        return True


def render(policy: Policy) -> str:
    """Return the effective policy as YAML that :func:`parse` reads back."""
    return yaml.dump(policy.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False)
