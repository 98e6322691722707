"""The example policy and the configuration reference, both generated from the models.

``python -m sovbackupd.config.reference`` rewrites ``config/policy.example.yaml`` and
``docs/configuration.md``; a test fails when the committed files drift from the models.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from sovbackupd.config import loader
from sovbackupd.config.models import MAX_KEEP, Policy, SourcePath

APP = "/opt/sovereigncore"
APP_COMPONENTS = ("sqlite", "config", "data")
"""What the SovereignCore application holds open: it is stopped while they are replaced."""

EXAMPLE = Policy.model_validate(
    {
        "backup_dir": "/var/backups/sovereigncore",
        "sources": {
            "redis": {
                "url": "redis://127.0.0.1:6379/0",
                "username": "backup",
                "password_file": "/etc/sovbackupd/redis-password",
                "rdb_path": "/var/lib/redis/dump.rdb",
            },
            "sqlite": [f"{APP}/sovereign_rekor.db"],
            "config": [
                f"{APP}/.env",
                f"{APP}/redis.conf",
                {"path": f"{APP}/users.acl", "optional": True},
                {"path": f"{APP}/prometheus.yml", "optional": True},
                {"path": f"{APP}/alertmanager.yml", "optional": True},
                {"path": f"{APP}/alerts.yml", "optional": True},
                {"path": f"{APP}/docker-compose.yml", "optional": True},
                {"path": f"{APP}/gunicorn.conf.py", "optional": True},
            ],
            "dirs": [f"{APP}/data", f"{APP}/mcp_data", f"{APP}/memory"],
            "exclude": ["*.tmp", "*.swp"],
        },
        "tiers": {
            "hourly": {"schedule": "0 * * * *", "keep": 24},
            "daily": {"schedule": "0 2 * * *", "keep": 30},
            "weekly": {"schedule": "0 3 * * 0", "keep": 12},
            "monthly": {"schedule": "0 4 1 * *", "keep": 12},
            "yearly": {"keep": 7},
        },
        "test_restore": {"schedule": "0 5 1 * *"},
        "restore": {
            # By component: `--only sqlite` stops the application and leaves Redis running.
            "stop": {
                "redis": [["systemctl", "stop", "redis-server"]],
                **{name: [["systemctl", "stop", "sovereigncore"]] for name in APP_COMPONENTS},
            },
            "start": {
                "redis": [["systemctl", "start", "redis-server"]],
                **{name: [["systemctl", "start", "sovereigncore"]] for name in APP_COMPONENTS},
            },
        },
        "remotes": [
            {
                "name": "backup-server",
                "type": "rsync",
                "url": "backup@backup-server:/backups/sovereigncore",
                "identity_file": "/etc/sovbackupd/ssh/id_ed25519",
                "known_hosts_file": "/etc/sovbackupd/ssh/known_hosts",
            },
        ],
        "notify": [
            {"type": "webhook", "url": "https://hc-ping.com/YOUR-UUID", "on": ["success"]},
            {"type": "webhook", "url": "https://hc-ping.com/YOUR-UUID/fail", "on": ["failure"]},
        ],
    }
)

HEADER = """\
# sovbackupd policy: what to back up, where, when, and for how long.
# Generated from the models in sovbackupd/config/models.py; docs/configuration.md has
# the same reference. Validate a change with: sovbackupd --config FILE check-config
"""


def _scalar(value: Any) -> str:  # noqa: ANN401 (any YAML scalar or flow collection)
    text = yaml.safe_dump(value, default_flow_style=True, width=1000, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _plain(value: Any) -> Any:  # noqa: ANN401 (mirrors the JSON dump of a model)
    """Shorten ``{path: X, optional: false}`` to ``X``, as a person would write it."""
    if isinstance(value, dict):
        if set(value) == {"path", "optional"} and not value["optional"]:
            return value["path"]
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _emit(model: BaseModel, indent: int, lines: list[str], explained: set[str]) -> None:
    pad = " " * indent
    dumped = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        key = f"{type(model).__name__}.{name}"
        if field.description and key not in explained:
            explained.add(key)
            lines.append(f"{pad}# {field.description}")
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _emit(value, indent + 2, lines, explained)
        elif isinstance(value, list) and value:
            lines.append(f"{pad}{name}:")
            lines.extend(f"{pad}  - {_scalar(_plain(item))}" for item in dumped[name])
        elif value is None and name in _TIER_NAMES:
            continue
        else:
            lines.append(f"{pad}{name}: {_scalar(dumped[name])}")


_TIER_NAMES = frozenset(("hourly", "daily", "weekly", "monthly", "yearly"))


def example_yaml() -> str:
    """Return the commented example policy."""
    lines = [HEADER.rstrip("\n")]
    _emit(EXAMPLE, 0, lines, set())
    return "\n".join(lines) + "\n"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        members = list(getattr(annotation, "__args__", (annotation,)))
        if get_origin(annotation) in (Union, UnionType):  # restore.stop's tagged branches
            members = [_unannotated(member) for member in members]
        models = [member for member in members if _is_model(member)]
        nested = models or _variants(annotation)
        # A list or a mapping (restore.stop): the list's default, the mapping's keys below.
        either = bool(models) and any(not _is_model(m) and m is not type(None) for m in members)
        if field.is_required():
            default = "required"
        elif nested and not either:
            default = "see below"
        else:
            value = field.get_default(call_default_factory=True, validated_data={})
            default = _scalar(TypeAdapter(cast(Any, annotation)).dump_python(value, mode="json"))
        kind = _type_name(annotation) + _bounds(field)
        rows.append(f"| `{key}` | {kind} | `{default}` | {field.description or ''} |")
        for submodel in nested:
            kind_field = submodel.model_fields.get("type")
            variant = get_args(kind_field.annotation) if kind_field is not None else ()
            if len(nested) > 1 and len(variant) == 1:  # a union told apart by its type key
                rows.extend(_rows(submodel, f"{key}[type={variant[0]}]."))
            else:
                rows.extend(_rows(submodel, f"{key}."))
    return rows


def _unannotated(annotation: Any) -> Any:  # noqa: ANN401 (any typing annotation)
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _is_model(annotation: Any) -> bool:  # noqa: ANN401 (any typing annotation)
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _bounds(field: FieldInfo) -> str:
    """Describe a number field's limits, e.g. ``, > 0 and <= 604800``."""
    limits = [
        f"{symbol} {getattr(constraint, name):g}"
        for constraint in field.metadata
        for name, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if getattr(constraint, name, None) is not None
    ]
    return f", {' and '.join(limits)}" if limits else ""


def _variants(annotation: Any) -> list[type[BaseModel]]:  # noqa: ANN401 (any typing annotation)
    """Return the models of a list of a union of models (remotes), else none."""
    if get_origin(annotation) is not list:
        return []
    (item,) = get_args(annotation)
    if get_origin(item) is Annotated:
        item = get_args(item)[0]
    if get_origin(item) not in (Union, UnionType):
        return []
    return [
        variant
        for variant in get_args(item)
        if isinstance(variant, type) and issubclass(variant, BaseModel)
    ]


def _type_name(annotation: Any) -> str:  # noqa: ANN401 (any typing annotation)
    """Name a field's type in words, for people (``list of path``, ``integer or null``)."""
    origin, arguments = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(arguments[0])
    if origin in (Union, UnionType):
        return " or ".join(dict.fromkeys(_type_name(argument) for argument in arguments))
    if origin is list:
        return f"list of {_type_name(arguments[0])}"
    if origin is Literal:
        return " or ".join(f"'{argument}'" for argument in arguments)
    if annotation is SourcePath:
        return "path or {path, optional}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return _WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


_WORDS: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
    type(None): "null",
}


def reference_markdown() -> str:
    """Return docs/configuration.md: every policy key, its type, default and meaning."""
    lines = [
        "# Policy reference",
        "",
        "Generated from `sovbackupd/config/models.py` by "
        "`python -m sovbackupd.config.reference`; do not edit by hand.",
        "",
        "The policy is YAML, by default `/etc/sovbackupd/policy.yaml` (or `--config`, or "
        "`$SOVBACKUPD_CONFIG`). Unknown keys are errors. Every problem is reported at "
        "once with its key path and line, and the command exits 78.",
        "",
        "Environment variables from the seed's scripts override the file: `BACKUP_DIR` "
        "sets `backup_dir`, `RETENTION_DAYS` sets `tiers.daily.keep` (adding a daily "
        "tier at `0 2 * * *` when the policy has none), `REMOTE_BACKUP_PATH` adds the "
        "rsync remote `remote` with that url (or sets the url of the policy's rsync remote "
        "`remote`).",
        "",
        "A source path is a string, or `{path: ..., optional: true}` for one that may be missing.",
        "",
        "Files on disk are checked in a separate step, not by the validation above (which "
        "stays pure, so a policy for another machine can be checked anywhere): "
        "`check-config`, the daemon's start and every reload (SIGHUP) also require "
        "`sources.redis.password_file`, every non-optional `sources.sqlite`, "
        "`sources.config` and `sources.dirs` entry, the `encryption.gpg` key and "
        "passphrase files, and the remotes' `identity_file`, `known_hosts_file` and "
        "`credentials_file` to exist, and report each missing one as a config error with "
        "its key and line. `rdb_path` and `aof_dir` are not required, since Redis creates "
        "them, and a file that the checking user may not look at is taken on trust. A "
        "reload that fails any check keeps the running policy (`config.reload_failed`). "
        "Backups do not repeat the check: a file that goes missing later fails that "
        "backup's source with its own error, and other commands (`list`, a `restore` on a "
        "recovery machine) do not need the files at all.",
        "",
        "Layouts whose backups could not be restored are refused, each with one line "
        "naming both paths and their keys: `backup_dir` inside (or equal to) a "
        "`sources.dirs` entry, since every backup would archive the earlier ones and "
        "restoring that directory would delete the newer ones (inside the directory of a "
        "config file or database is fine); any source inside `backup_dir`; a data "
        "directory inside (or equal to) another, which would be archived twice, and a "
        "database, config file or Redis file inside a data directory, for the same "
        "reason; two "
        "sources with one archive name (directories and databases share the top of the "
        "archive, config files share `config/`). `backup_dir` may not be `/`, `/bin`, "
        "`/boot`, `/etc`, `/lib*`, `/sbin`, `/usr`, `/var`, `/tmp` or `/var/tmp`, nor "
        "anything below `/proc`, `/sys`, `/dev` or `/run` (tmpfs, lost at boot); the same "
        "holds for `BACKUP_DIR`. Validation compares the paths as written; `check-config`, "
        "start and reload compare them again with symlinks resolved, so `data -> /srv/x` "
        "with `backup_dir: /srv/x/backups` is refused too. Every backup checks the layout "
        "once more under its lock, and its walk of a data directory fails (exit 78) when it "
        "meets `backup_dir` by device and inode, as through a bind mount.",
        "",
        "An existing `backup_dir` is never chmod'ed: one that its group or others can "
        "write (0775, 1777, ...) is refused at `check-config`, start, reload and before "
        "every backup, prune or restore, and so is one owned by a non-root user other than "
        "the one running sovbackupd (root may use the service user's directory), or one "
        "reached through a directory others can write: without the sticky bit they could "
        "rename it away and plant their own; with it (`/tmp/x`), one another user made is "
        "theirs. 0700, "
        "0750 and 0755 are kept as they are: the archives inside are 0600. A `backup_dir` "
        "sovbackupd creates is made 0700. Run `check-config` as the service user or root: "
        "for another user the owner check refuses the service user's directory.",
        "",
        "Limits, so that a damaged or hostile file is refused at once: a policy is at most "
        f"{loader.MAX_POLICY_BYTES >> 10} KiB, {loader.MAX_DEPTH} levels deep and "
        f"{loader.MAX_NODES} values, a value at most {loader.MAX_SCALAR_CHARS} characters "
        f"and a number at most {loader.MAX_NUMBER_CHARS}. YAML anchors, aliases and "
        "explicit tags (`&a`, `*a`, `!!int`) are refused, and so is a key set twice in one "
        "mapping. Numbers must be finite (no `.inf` or `.nan`) and within the limits the "
        f"table gives; a `keep` count is at most {MAX_KEEP}.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
        *_rows(Policy, ""),
        "",
        "## Example",
        "",
        "```yaml",
        example_yaml().rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)


GENERATED = {
    Path("config/policy.example.yaml"): example_yaml,
    Path("docs/configuration.md"): reference_markdown,
}


def main(root: Path) -> None:
    """Rewrite the generated files below the repository *root*."""
    for relative, generate in GENERATED.items():
        (root / relative).write_text(generate())


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path())
