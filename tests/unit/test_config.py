"""The policy file: validation, error reporting, environment overrides, rendering."""

from __future__ import annotations

import copy
import os
import re
import socket
import textwrap
import threading
import tracemalloc
import typing
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from sovbackupd import config, scheduler
from sovbackupd.config.files import Location
from sovbackupd.config.loader import MAX_POLICY_BYTES, SEED_DAILY_SCHEDULE
from sovbackupd.config.models import (
    MAX_PREFIX_CHARS,
    PATTERN_EXPECTATIONS,
    GcsRemote,
    Policy,
    RsyncRemote,
    S3Remote,
    SourcePath,
)
from sovbackupd.errors import ConfigError, ExitCode
from tests.conftest import Sandbox, policy_data, run_cli, write_policy

VALID = """\
backup_dir: /var/backups/sovereigncore
name_prefix: sovereigncore_backup
timezone: Europe/Berlin
compression: zstd
workers: 3
sources:
  redis: {url: "redis://127.0.0.1:6379/0", rdb_path: /var/lib/redis/dump.rdb}
  sqlite: [/opt/sovereigncore/sovereign_rekor.db]
  config: [/opt/sovereigncore/.env, /opt/sovereigncore/redis.conf]
  dirs: [/opt/sovereigncore/data, /opt/sovereigncore/mcp_data, /opt/sovereigncore/memory]
  exclude: ["*.tmp"]
tiers:
  hourly:  {schedule: "0 * * * *", keep: 24}
  daily:   {schedule: "0 2 * * *", keep: 30}
  weekly:  {schedule: "0 3 * * 0", keep: 12}
  monthly: {schedule: "0 4 1 * *", keep: unlimited}
  yearly:  {keep: 7}
"""

MINIMAL = "sources:\n  dirs: [/srv/data]\n"


def parse(text: str, environ: dict[str, str] | None = None) -> Policy:
    return config.parse(textwrap.dedent(text), "policy.yaml", environ or {})


def problems_of(text: str, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse(text, environ)
    assert caught.value.exit_code == ExitCode.CONFIG
    assert caught.value.problems, "a validation error carries its problems"
    return caught.value.problems


def test_valid_policy_loads_every_section() -> None:
    """A policy using every documented key loads with its values."""
    policy = parse(VALID)
    assert policy.backup_dir == Path("/var/backups/sovereigncore")
    assert policy.timezone == "Europe/Berlin"
    assert policy.compression == "zstd"
    assert policy.archive_suffix == ".tar.zst"
    assert policy.workers == 3
    assert policy.sources.redis is not None
    assert policy.sources.redis.rdb_path == Path("/var/lib/redis/dump.rdb")
    assert [entry.path.name for entry in policy.sources.dirs] == ["data", "mcp_data", "memory"]
    assert policy.sources.exclude == ["*.tmp"]
    tiers = policy.tiers.configured()
    assert list(tiers) == ["hourly", "daily", "weekly", "monthly", "yearly"]
    assert tiers["daily"].keep == 30
    assert tiers["monthly"].keep == "unlimited"
    assert tiers["yearly"].schedule is None


def test_defaults_fill_in_a_minimal_policy() -> None:
    """A policy naming only one source takes the documented defaults for the rest."""
    policy = parse(MINIMAL)
    assert policy.backup_dir == Path("/var/backups/sovereigncore")
    assert policy.name_prefix == "sovereigncore_backup"
    assert policy.timezone == "UTC"
    assert policy.compression == "gzip"
    assert policy.archive_suffix == ".tar.gz"
    assert policy.workers == 2
    assert policy.tiers.configured() == {}


def test_every_problem_is_reported_at_once_with_key_path_and_line() -> None:
    """All problems of a bad policy come back together, each as file:line: key.path: why."""
    problems = problems_of(
        """\
        backup_dir: /var/backups/sovereigncore
        workers: 0
        sources:
          dirs: [/srv/data]
        tiers:
          daily:
            keep: -1
            schedule: "0 2 * * *"
          weekly: {schedule: "0 3 * * 0", keep: 12}
        compression: bzip2
        """
    )
    assert sorted(problems) == [
        "policy.yaml:10: compression: Input should be 'gzip', 'zstd' or 'none'",
        "policy.yaml:2: workers: Input should be greater than or equal to 1",
        "policy.yaml:7: tiers.daily.keep: must be a whole number from 0 to 100000, or 'unlimited'",
    ]


def test_keep_that_is_neither_a_count_nor_unlimited_is_reported_on_its_line() -> None:
    """`keep: many` is reported at tiers.<tier>.keep on its line."""
    problems = problems_of(
        """\
        sources: {dirs: [/srv/data]}
        tiers:
          weekly: {schedule: "0 3 * * 0", keep: many}
        """
    )
    assert len(problems) == 1, problems
    assert all(problem.startswith("policy.yaml:3: tiers.weekly.keep: ") for problem in problems)


def test_headline_counts_the_problems_and_names_the_first() -> None:
    """The error's message says how many problems there are and shows the first."""
    with pytest.raises(ConfigError) as caught:
        parse("workers: 0\nsources: {dirs: [/srv/data]}\ncolour: blue\n")
    message = str(caught.value)
    assert message.startswith("policy.yaml: invalid policy (2 problems): policy.yaml:1: workers")


def test_unknown_keys_are_named_with_their_line() -> None:
    """An unknown key at any depth is reported by its dotted path and line."""
    problems = problems_of(
        """\
        sources:
          dirs: [/srv/data]
          bogus: 1
        tiers:
          weekly: {schedule: "0 3 * * 0", keep: 12, every: 2}
        colour: blue
        """
    )
    assert set(problems) == {
        "policy.yaml:3: sources.bogus: unknown key",
        "policy.yaml:5: tiers.weekly.every: unknown key",
        "policy.yaml:6: colour: unknown key",
    }


def test_unknown_key_inside_a_list_item_names_its_index() -> None:
    """A typo inside a `{path:, optional:}` entry names the list index and its line."""
    problems = problems_of(
        """\
        sources:
          config:
            - /etc/a.conf
            - {path: /etc/b.conf, optinal: true}
        """
    )
    assert problems == ("policy.yaml:4: sources.config[1].optinal: unknown key",)


def test_invalid_cron_is_reported_on_its_tier() -> None:
    """A schedule that is not a cron expression is reported at tiers.<tier>.schedule."""
    problems = problems_of(
        """\
        sources: {dirs: [/srv/data]}
        tiers:
          hourly: {schedule: "61 * * * *", keep: 24}
          daily: {schedule: "0 2 * *", keep: 7}
        """
    )
    assert len(problems) == 2
    assert problems[0].startswith("policy.yaml:3: tiers.hourly.schedule: ")
    assert "61" in problems[0]
    assert problems[1].startswith("policy.yaml:4: tiers.daily.schedule: ")
    assert "5 fields" in problems[1]


def test_invalid_timezone_is_reported() -> None:
    """An unknown IANA zone name is an error on the timezone key."""
    problems = problems_of("timezone: Mars/Olympus_Mons\nsources: {dirs: [/srv/data]}\n")
    assert problems == ("policy.yaml:1: timezone: unknown time zone 'Mars/Olympus_Mons'",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "backup_dir: backups\nsources: {dirs: [/srv/data]}\n",
            "policy.yaml:1: backup_dir: must be an absolute path, not 'backups'",
        ),
        (
            "sources:\n  sqlite: [rekor.db]\n",
            "policy.yaml:2: sources.sqlite[0]: must be an absolute path, not 'rekor.db'",
        ),
        (
            "sources:\n  dirs:\n    - {path: data, optional: true}\n",
            "policy.yaml:3: sources.dirs[0].path: must be an absolute path, not 'data'",
        ),
        (
            "sources:\n  redis: {rdb_path: dump.rdb}\n",
            "policy.yaml:2: sources.redis.rdb_path: must be an absolute path, not 'dump.rdb'",
        ),
    ],
)
def test_relative_paths_are_rejected(text: str, expected: str) -> None:
    """Every path in the policy must be absolute; a relative one is named where it is."""
    assert problems_of(text) == (expected,)


def test_a_leading_double_slash_is_read_as_the_root() -> None:
    """`//opt/x` names /opt/x on Linux; kept as written, no restore took its members back."""
    policy = parse(
        """\
        backup_dir: //var/backups/sov
        sources:
          sqlite: [//opt/app/app.db]
          config: [//opt/app/.env]
          dirs: [//opt/app/data]
          redis: {url: "redis://127.0.0.1:6379/0", rdb_path: //var/lib/redis/dump.rdb}
        """
    )
    paths = [
        policy.backup_dir,
        policy.sources.sqlite[0].path,
        policy.sources.config[0].path,
        policy.sources.dirs[0].path,
        policy.sources.redis.rdb_path if policy.sources.redis else None,
    ]
    assert [str(path) for path in paths] == [
        "/var/backups/sov",
        "/opt/app/app.db",
        "/opt/app/.env",
        "/opt/app/data",
        "/var/lib/redis/dump.rdb",
    ]


def test_duplicate_basenames_in_one_list_are_rejected() -> None:
    """Two directories archived under the same basename would collide inside the archive."""
    problems = problems_of("sources:\n  dirs: [/a/data, /b/data]\n")
    assert len(problems) == 1
    assert problems[0].startswith("policy.yaml:2: sources.dirs: ")
    assert "'data'" in problems[0]


def test_database_and_directory_sharing_a_name_are_rejected() -> None:
    """A database and a directory with the same basename would share one archive path."""
    problems = problems_of("sources:\n  sqlite: [/a/store]\n  dirs: [/b/store]\n")
    assert len(problems) == 1
    assert problems[0].startswith("policy.yaml:1: sources: ")
    assert "store" in problems[0]


def test_reserved_archive_names_are_rejected() -> None:
    """A source may not take a name the archive layout reserves, like config/."""
    problems = problems_of("sources:\n  dirs: [/etc/sovereigncore/config]\n")
    assert len(problems) == 1
    assert "reserved archive name 'config'" in problems[0]


def test_policy_without_sources_is_rejected() -> None:
    """An empty sources mapping is an error; a missing one is a missing key."""
    assert problems_of("sources: {}\n") == (
        "policy.yaml:1: sources: no sources: name at least one of redis, sqlite, config, dirs",
    )
    assert problems_of("workers: 2\n") == ("policy.yaml:1: sources: required key is missing",)


def test_source_paths_take_the_string_shorthand_and_the_mapping_form() -> None:
    """`- /path` and `- {path: /path, optional: true}` both describe a source path."""
    policy = parse(
        """\
        sources:
          config:
            - /opt/sovereigncore/.env
            - {path: /opt/sovereigncore/redis.conf, optional: true}
            - {path: /opt/sovereigncore/extra.conf}
        """
    )
    assert policy.sources.config == [
        SourcePath(path=Path("/opt/sovereigncore/.env"), optional=False),
        SourcePath(path=Path("/opt/sovereigncore/redis.conf"), optional=True),
        SourcePath(path=Path("/opt/sovereigncore/extra.conf"), optional=False),
    ]


def test_backup_dir_comes_from_the_environment() -> None:
    """BACKUP_DIR, as the seed's scripts use it, replaces backup_dir."""
    policy = parse(VALID, {"BACKUP_DIR": "/srv/backups"})
    assert policy.backup_dir == Path("/srv/backups")


def test_retention_days_sets_the_daily_keep() -> None:
    """RETENTION_DAYS overrides tiers.daily.keep and leaves its schedule alone."""
    policy = parse(VALID, {"RETENTION_DAYS": "14"})
    assert policy.tiers.daily is not None
    assert policy.tiers.daily.keep == 14
    assert policy.tiers.daily.schedule == "0 2 * * *"
    assert policy.tiers.weekly is not None
    assert policy.tiers.weekly.keep == 12


def test_retention_days_creates_the_seeds_daily_tier_when_missing() -> None:
    """Without a daily tier, RETENTION_DAYS adds one on the seed's 02:00 schedule."""
    policy = parse(MINIMAL, {"RETENTION_DAYS": "7"})
    assert SEED_DAILY_SCHEDULE == "0 2 * * *"
    assert policy.tiers.daily is not None
    assert policy.tiers.daily.schedule == SEED_DAILY_SCHEDULE
    assert policy.tiers.daily.keep == 7


@pytest.mark.parametrize("value", ["seven", "-1", "7.5", "", "\u00b2"])
def test_non_numeric_retention_days_is_an_error(value: str) -> None:
    """RETENTION_DAYS must be a whole number of days; anything else is named as such."""
    problems = problems_of(MINIMAL, {"RETENTION_DAYS": value})
    assert problems == (
        f"RETENTION_DAYS (environment): must be a whole number of days, not {value!r}",
    )


def test_environment_problems_are_reported_with_policy_problems() -> None:
    """A bad environment and a bad policy are reported together."""
    problems = problems_of("workers: 0\n" + MINIMAL, {"RETENTION_DAYS": "x"})
    assert len(problems) == 2
    assert problems[0].startswith("RETENTION_DAYS (environment): ")
    assert problems[1].startswith("policy.yaml:1: workers: ")


def test_relative_backup_dir_from_the_environment_names_the_variable() -> None:
    """A relative BACKUP_DIR is blamed on the environment, not on a policy line."""
    problems = problems_of("backup_dir: /srv/backups\n" + MINIMAL, {"BACKUP_DIR": "backups"})
    assert problems == ("BACKUP_DIR (environment): must be an absolute path, not 'backups'",)


def test_remote_backup_path_adds_the_rsync_remote_named_remote() -> None:
    """REMOTE_BACKUP_PATH, as the seed exports it, becomes the rsync remote 'remote'."""
    policy = parse(MINIMAL, {"REMOTE_BACKUP_PATH": "user@backup-server:/backups/sovereigncore"})
    [remote] = policy.remotes
    assert isinstance(remote, RsyncRemote)
    assert (remote.name, remote.url, remote.port) == (
        "remote",
        "user@backup-server:/backups/sovereigncore",
        22,
    )


def test_remote_backup_path_sets_the_url_of_the_policy_remote_named_remote() -> None:
    """A policy's rsync remote 'remote' keeps its settings and takes the variable's url."""
    text = MINIMAL + textwrap.dedent("""\
        remotes:
          - {name: remote, type: rsync, url: "old@host:/old", port: 2222}
          - {name: s3, type: s3, bucket: your-bucket}
        """)
    policy = parse(text, {"REMOTE_BACKUP_PATH": "new@host:/new"})
    first, second = policy.remotes
    assert isinstance(first, RsyncRemote)
    assert (first.url, first.port) == ("new@host:/new", 2222)
    assert isinstance(second, S3Remote)


def test_remote_backup_path_problems_name_the_variable() -> None:
    """A malformed REMOTE_BACKUP_PATH, or a non-rsync remote 'remote', is named as such."""
    problems = problems_of(MINIMAL, {"REMOTE_BACKUP_PATH": "/just/a/path"})
    assert problems == (
        "REMOTE_BACKUP_PATH (environment): must be user@host:/path, not '/just/a/path'",
    )
    text = MINIMAL + "remotes: [{name: remote, type: gcs, bucket: b}]\n"
    [problem] = problems_of(text, {"REMOTE_BACKUP_PATH": "u@h:/p"})
    assert problem.startswith("REMOTE_BACKUP_PATH (environment): the policy's remote 'remote'")


def test_remotes_of_each_type_load_and_names_must_be_unique() -> None:
    """rsync, s3 and gcs remotes load by their type; a name used twice is an error."""
    text = MINIMAL + textwrap.dedent("""\
        remotes:
          - {name: backup-server, type: rsync, url: "user@backup-server:/backups"}
          - {name: s3, type: s3, bucket: your-bucket, endpoint_url: "http://minio:9000"}
          - {name: gcs, type: gcs, bucket: your-bucket, prefix: backups/}
        """)
    assert [type(remote) for remote in parse(text).remotes] == [RsyncRemote, S3Remote, GcsRemote]
    duplicated = MINIMAL + textwrap.dedent("""\
        remotes:
          - {name: offsite, type: s3, bucket: a}
          - {name: offsite, type: gcs, bucket: b}
        """)
    assert problems_of(duplicated) == (
        "policy.yaml:3: remotes: remote names must be unique: offsite",
    )


def test_remote_problems_name_the_key_without_the_union_branch() -> None:
    """A bad field of a remote is reported at remotes[i].field, and an unknown type too."""
    text = MINIMAL + textwrap.dedent("""\
        remotes:
          - {name: backup-server, type: rsync, url: "no-colon-here", port: 0}
          - {name: tape, type: tape}
        """)
    problems = problems_of(text)
    assert problems[0] == (
        "policy.yaml:4: remotes[0].url: must be [user@]host:path, e.g. "
        "backup@backup-server:/backups/sovereigncore, not 'no-colon-here'"
    )
    assert problems[1].startswith("policy.yaml:4: remotes[0].port: ")
    assert problems[2].startswith("policy.yaml:5: remotes[1]")
    assert "'rsync', 's3', 'gcs'" in problems[2]


def test_empty_environment_variables_change_nothing() -> None:
    """Set-but-empty BACKUP_DIR and REMOTE_BACKUP_PATH are ignored like unset ones."""
    policy = parse(MINIMAL, {"BACKUP_DIR": "", "REMOTE_BACKUP_PATH": ""})
    assert policy == parse(MINIMAL)


def test_load_reads_the_file_and_names_it_in_errors(tmp_path: Path) -> None:
    """load() validates the file at a path and uses that path in every problem."""
    path = tmp_path / "policy.yaml"
    path.write_text(MINIMAL)
    assert config.load(path, {}) == parse(MINIMAL)
    path.write_text("workers: 0\n" + MINIMAL)
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    assert caught.value.problems == (
        f"{path}:1: workers: Input should be greater than or equal to 1",
    )


def test_load_applies_the_given_environment(tmp_path: Path) -> None:
    """load() applies the overrides of the environment it is given."""
    path = tmp_path / "policy.yaml"
    path.write_text(MINIMAL)
    policy = config.load(path, {"BACKUP_DIR": "/srv/elsewhere"})
    assert policy.backup_dir == Path("/srv/elsewhere")


def test_missing_policy_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing policy file exits 78 (EX_CONFIG) with a message naming it."""
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=re.escape("absent.yaml not found")) as caught:
        config.load(path, {})
    assert caught.value.exit_code == 78


def test_unreadable_policy_file_is_a_config_error(tmp_path: Path) -> None:
    """A policy path that cannot be read (here a directory) exits 78 with the reason."""
    with pytest.raises(ConfigError, match="cannot be read") as caught:
        config.load(tmp_path, {})
    assert caught.value.exit_code == 78


def test_policy_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """A binary policy file is refused with a clear message, not a traceback."""
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"sources: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8") as caught:
        config.load(path, {})
    assert caught.value.exit_code == 78


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("sources:\n  dirs: [/srv/data\n", 3),
        ("sources:\n  dirs: /a: b\n", 2),
        ("sources:\n\tdirs: [/srv/data]\n", 2),
    ],
)
def test_invalid_yaml_reports_its_line(text: str, line: int) -> None:
    """A YAML syntax error is a ConfigError naming the file and the line."""
    with pytest.raises(ConfigError, match=rf"^policy\.yaml:{line}: not valid YAML: ") as caught:
        parse(text)
    assert caught.value.exit_code == 78


@pytest.mark.parametrize("text", ["- /srv/data\n", "just a string\n", "42\n"])
def test_policy_that_is_not_a_mapping_is_rejected(text: str) -> None:
    """A YAML document that is not a mapping cannot be a policy."""
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse(text)


def test_empty_policy_reports_missing_sources() -> None:
    """An empty file is a policy with no sources, reported as such."""
    with pytest.raises(ConfigError) as caught:
        parse("")
    assert caught.value.problems == ("policy.yaml: sources: required key is missing",)


@pytest.mark.parametrize("text", [VALID, MINIMAL])
def test_rendered_policy_parses_back_to_the_same_policy(text: str) -> None:
    """render() writes YAML that parse() turns back into an equal policy."""
    policy = parse(text, {"RETENTION_DAYS": "9"})
    rendered = config.render(policy)
    assert config.parse(rendered, "rendered.yaml", {}) == policy


def test_retention_days_with_a_malformed_daily_tier_reports_the_tier() -> None:
    """RETENTION_DAYS beside a daily tier that is not a mapping gives a policy error."""
    problems = problems_of(MINIMAL + 'tiers:\n  daily: "0 2 * * *"\n', {"RETENTION_DAYS": "7"})
    assert len(problems) == 1
    assert problems[0].startswith("policy.yaml:4: tiers.daily: ")


def test_notify_on_key_is_a_key_not_a_yaml_boolean() -> None:
    """`on: [failure]` in a webhook is the key 'on' (YAML 1.2), not the boolean True."""
    policy = config.parse(
        "sources: {dirs: [/srv/data]}\n"
        'notify: [{type: webhook, url: "https://hc.example/x", on: [success, failure]}]\n',
        "policy.yaml",
        {},
    )
    assert policy.notify[0].on == ["success", "failure"]


# Hostile or absurd input: refused before it costs anything, as one config error line.


def alias_bomb(levels: int = 7, fanout: int = 10) -> str:
    """Return the "billion laughs": each level is a list of *fanout* aliases of the last."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels + 1):
        aliases = ",".join([f"*l{level - 1}"] * fanout)
        lines.append(f"l{level}: &l{level} [{aliases}]")
    return "\n".join(lines) + "\n"


def refusal(text: str) -> tuple[str, int]:
    """Parse hostile *text*; return the one config error line and the peak bytes allocated."""
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as caught:
            config.parse(text, "policy.yaml", {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.exit_code == ExitCode.CONFIG
    lines = caught.value.problems or (str(caught.value),)
    assert len(lines) == 1, lines
    return lines[0], peak


def test_alias_bomb_is_refused_at_its_first_anchor_without_expanding_it() -> None:
    """Invariant: aliases are refused while composing, so the bomb never grows in memory."""
    bomb = alias_bomb()
    assert len(bomb) < 600  # the 512-byte bomb: 10**7 strings once expanded
    line, peak = refusal(bomb)
    assert line == "policy.yaml:1: anchors and aliases (&name, *name) are not allowed in a policy"
    assert peak < 1 << 20


HOSTILE_DOCUMENTS = {
    "flow nesting": ("sources:\n  dirs: " + "[" * 3000 + "]" * 3000 + "\n", 2, "nesting"),
    "block nesting": ("".join(" " * depth + f"k{depth}:\n" for depth in range(100)), 32, "nesting"),
    "5000-digit integer": ("workers: " + "9" * 5000 + "\n", 1, "a number longer than 32"),
    "impossible date": ("sources: {dirs: [/srv]}\nworkers: 2026-13-45\n", 2, "month must be"),
    "explicit tag": ("sources: {dirs: [/srv]}\nworkers: !!int abc\n", 2, "explicit tags"),
    "huge value": ("backup_dir: /" + "a" * 100_000 + "\n", 1, "a value longer than"),
    "too many values": ("sources:\n  dirs:\n" + "    - /srv\n" * 20_000, 9998, "more than"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_DOCUMENTS))
def test_hostile_documents_are_refused_with_one_line_naming_file_and_line(name: str) -> None:
    """Invariant: deep, huge or odd YAML is a config error at its line, never an exception."""
    text, line_number, reason = HOSTILE_DOCUMENTS[name]
    line, peak = refusal(text)
    assert line.startswith(f"policy.yaml:{line_number}: "), line
    assert reason in line
    assert peak < 8 << 20


def test_policy_file_larger_than_the_bound_is_refused_unread(tmp_path: Path) -> None:
    """Invariant: load() reads at most MAX_POLICY_BYTES + 1 bytes of a policy file."""
    path = tmp_path / "policy.yaml"
    path.write_text(MINIMAL + "#" * (64 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="larger than 256 KiB") as caught:
            config.load(path, {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.exit_code == ExitCode.CONFIG
    assert peak < 4 * MAX_POLICY_BYTES


YAML_FRAGMENTS = [
    "sources:",
    "dirs:",
    "  ",
    "\n",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ",",
    ": ",
    "&a ",
    "*a",
    "!!int ",
    "!!str ",
    "? ",
    "'",
    '"',
    "#",
    "---\n",
    "...\n",
    "<<: ",
    "1e999",
    ".inf",
    ".nan",
    "0x1f",
    "2026-13-45",
    "9" * 40,
    "~",
    "null",
    "true",
    "on",
    "/srv/data",
    "workers",
    "tiers",
    "daily",
    "keep",
    "schedule",
    "'0 2 * * *'",
    "\t",
    "%YAML 1.1\n",
    "\\",
    "|",
    ">",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(YAML_FRAGMENTS) | st.text(max_size=4), max_size=40))
def test_any_text_is_a_policy_or_a_config_error(parts: list[str]) -> None:
    """Invariant: parse() returns a Policy or raises ConfigError; no other exception escapes."""
    try:
        config.parse("".join(parts), "policy.yaml", {})
    except ConfigError as error:
        assert error.exit_code == ExitCode.CONFIG


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "workers: 2\nsources: {dirs: [/srv]}\nworkers: 3\n",
            "policy.yaml:3: workers: set twice: line 1 sets it first",
        ),
        (
            "sources:\n  dirs: [/srv]\n  redis: {url: 'redis://a'}\n  redis: {url: 'redis://b'}\n",
            "policy.yaml:4: sources.redis: set twice: line 3 sets it first",
        ),
        (
            "sources: {dirs: [/srv]}\ntiers:\n  daily: {keep: 3, schedule: '0 2 * * *', keep: 4}\n",
            "policy.yaml:3: tiers.daily.keep: set twice: line 3 sets it first",
        ),
    ],
)
def test_a_key_set_twice_is_an_error_naming_both_lines(text: str, expected: str) -> None:
    """YAML would silently take the last value of a repeated key; the policy refuses it."""
    assert problems_of(text) == (expected,)


def test_a_repeated_key_is_reported_with_the_other_problems() -> None:
    """A repeated key does not hide the validation problems of the rest of the file."""
    problems = problems_of("workers: 0\nsources: {dirs: [/srv]}\nworkers: 0\n")
    assert problems == (
        "policy.yaml:1: workers: Input should be greater than or equal to 1",
        "policy.yaml:3: workers: set twice: line 1 sets it first",
    )


# Numbers: every one bounded, finite, and usable by the daemon's timers.

BASE_WITH_EVERY_NUMBER: dict[str, Any] = {
    "sources": {"redis": {"url": "redis://127.0.0.1:6379/0"}, "dirs": ["/srv/data"]},
    "tiers": {name: {"schedule": "0 2 * * *", "keep": 3} for name in ("hourly", "daily")},
    "retention": {"keep_last": 3, "size_guard": {"ratio": 0.5, "window": 5}},
    "remotes": [{"name": "offsite", "type": "rsync", "url": "backup@host:/backups"}],
    "notify": [{"type": "webhook", "url": "https://hc.example/x"}],
}


def _numeric(annotation: object) -> bool:
    if annotation in (int, float):
        return True
    return any(_numeric(argument) for argument in typing.get_args(annotation))


def numeric_keys(model: BaseModel, prefix: Location = ()) -> list[Location]:
    """Return the location of every int or float field under *model*."""
    found: list[Location] = []
    for name, field in type(model).model_fields.items():
        value, location = getattr(model, name), (*prefix, name)
        if _numeric(field.annotation):
            found.append(location)
        elif isinstance(value, BaseModel):
            found.extend(numeric_keys(value, location))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, BaseModel):
                    found.extend(numeric_keys(item, (*location, index)))
    return found


NUMERIC_KEYS = numeric_keys(Policy.model_validate(BASE_WITH_EVERY_NUMBER))


def substituted(location: Location, number: object) -> dict[str, Any]:
    """Return the base policy with *number* at *location*."""
    data = copy.deepcopy(BASE_WITH_EVERY_NUMBER)
    node: Any = data
    for part in location[:-1]:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    node[location[-1]] = number
    return data


def timers_accept(policy: Policy) -> None:
    """Build every timer, timeout and schedule the daemon builds from the policy's numbers."""
    runner = scheduler.Scheduler(lambda tiers: None, policy.zone)
    runner.start({}, {}, scheduler.Timing(policy.workers, policy.daemon.misfire_grace_seconds))
    try:
        runner.every(policy.daemon.disk_refresh_seconds, lambda: None, "disk")
    finally:
        runner.shutdown()
    seconds = [
        value
        for location in NUMERIC_KEYS
        if str(location[-1]).endswith("_seconds")
        for value in [_value_at(policy, location)]
    ]
    probe = threading.Lock()  # Timer, Event.wait and subprocess waits all come down to this
    with socket.socket() as connection:
        for value in seconds:
            assert probe.acquire(timeout=value)
            probe.release()
            connection.settimeout(value)
            assert timedelta(seconds=value) >= timedelta(0)


def _value_at(policy: Policy, location: Location) -> Any:
    node: Any = policy
    for part in location:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def test_every_section_with_numbers_is_covered_by_the_base_policy() -> None:
    """The number property reaches every numeric field of every model in the policy."""
    covered = {location[-1] for location in NUMERIC_KEYS}
    assert {"misfire_grace_seconds", "timeout_seconds", "keep", "window", "port"} <= covered
    assert len(NUMERIC_KEYS) >= 18, NUMERIC_KEYS


NUMBERS = (
    st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()
    | st.floats(min_value=-2.0, max_value=2.0)
    | st.sampled_from([0, 1, 0.5, 1e-300, 1e300, 604800, 604800.5, 10**9, 2**63, True])
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(NUMERIC_KEYS), NUMBERS)
def test_any_number_in_any_numeric_field_loads_usable_or_is_a_config_error(
    location: Location, number: object
) -> None:
    """Invariant: any number anywhere gives a policy the daemon's timers accept, or ConfigError."""
    text = yaml.safe_dump(substituted(location, number), sort_keys=False)
    try:
        policy = config.parse(text, "policy.yaml", {})
    except ConfigError as error:
        assert error.exit_code == ExitCode.CONFIG
        return
    timers_accept(policy)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_infinite_or_nan_misfire_grace_is_a_config_error(value: str) -> None:
    """`misfire_grace_seconds: .inf` passed once and crashed `run`; now it names the key."""
    assert problems_of(f"daemon: {{misfire_grace_seconds: {value}}}\n" + MINIMAL) == (
        "policy.yaml:1: daemon.misfire_grace_seconds: Input should be a finite number",
    )


# Values whose shape an operator must get right: say what is expected, never a regex.


@pytest.mark.parametrize(
    ("url", "given_text"),
    [
        ("http://user:hunter2@cache:6379/0", "one starting http://"),
        ("cache:6379", "something without a scheme"),
    ],
)
def test_redis_url_must_be_redis_rediss_or_unix_without_echoing_it(
    url: str, given_text: str
) -> None:
    """An http:// Redis URL is a config error naming the key; the URL's password stays out."""
    problems = problems_of(f"sources:\n  redis: {{url: '{url}'}}\n")
    assert problems == (
        "policy.yaml:2: sources.redis.url: must be a redis://, rediss:// or unix:// URL, "
        f"not {given_text}",
    )
    assert "hunter2" not in problems[0]


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://cache:6380/1", "unix:///run/redis.sock"]
)
def test_redis_urls_of_every_supported_scheme_load(url: str) -> None:
    """redis://, rediss:// and unix:// are what redis-py connects to."""
    policy = parse(f"sources:\n  redis: {{url: '{url}'}}\n")
    assert policy.sources.redis is not None
    assert policy.sources.redis.url == url


@pytest.mark.parametrize("listen", ["localhost", "127.0.0.1:70000", "127.0.0.1:0", ":9877"])
def test_metrics_listen_error_says_host_port_not_a_regex(listen: str) -> None:
    """A bad metrics.listen explains host:port with an example, and ports stay in range."""
    assert problems_of(MINIMAL + f"metrics: {{listen: '{listen}'}}\n") == (
        "policy.yaml:3: metrics.listen: must be host:port with a port from 1 to 65535, "
        f"e.g. 127.0.0.1:9877 or [::1]:9877, not {listen!r}",
    )


@pytest.mark.parametrize("listen", ["127.0.0.1:9877", "[::1]:1", "0.0.0.0:65535", "host:80"])
def test_metrics_listen_takes_hosts_and_bracketed_ipv6(listen: str) -> None:
    """host:port, [v6]:port, and the whole port range load."""
    assert parse(MINIMAL + f"metrics: {{listen: '{listen}'}}\n").metrics.listen == listen


def _patterns(schema: object) -> set[str]:
    if isinstance(schema, dict):
        found = {schema["pattern"]} if isinstance(schema.get("pattern"), str) else set()
        return found.union(*(_patterns(value) for value in schema.values()))
    if isinstance(schema, list):
        return set().union(*(_patterns(value) for value in schema))
    return set()


def test_every_pattern_in_the_policy_has_words_for_its_error() -> None:
    """No pattern reaches an operator as a raw regex: each has an expectation in words."""
    patterns = _patterns(Policy.model_json_schema())
    assert patterns
    assert patterns <= set(PATTERN_EXPECTATIONS)


def test_pattern_mismatch_says_what_is_expected() -> None:
    """A remote name with a space is explained in words, with the value given."""
    problems = problems_of(
        MINIMAL + "remotes:\n  - {name: 'off site', type: rsync, url: 'b@h:/x'}\n"
    )
    assert problems == (
        "policy.yaml:4: remotes[0].name: must be letters, digits, '_', '.' and '-', "
        "starting with a letter or digit, not 'off site'",
    )


def test_rendered_policy_never_holds_aliases() -> None:
    """render() writes repeated values in full, since the loader refuses aliases."""
    policy = parse(MINIMAL + "hooks:\n  before_backup: [[a, b]]\n  after_backup: [[a, b]]\n")
    rendered = config.render(policy)
    assert "&" not in rendered and "*id" not in rendered
    assert config.parse(rendered, "rendered.yaml", {}) == policy


# Files on disk: checked by check-config, daemon start and reload, not by validation.


def policy_naming_files(root: Path) -> str:
    """Return a policy naming every kind of file the backup needs, all under *root*."""
    return textwrap.dedent(f"""\
        sources:
          redis: {{url: "redis://127.0.0.1:6379/0", password_file: {root}/redis-password}}
          sqlite: [{root}/app.db, {{path: {root}/maybe.db, optional: true}}]
          config: [{root}/.env]
          dirs: [{root}/data]
        encryption:
          gpg: {{recipients: [ABCDEF], public_keys_file: {root}/public.asc}}
        remotes:
          - {{name: offsite, type: rsync, url: "b@h:/x", identity_file: {root}/id_ed25519}}
        """)


def test_check_files_names_each_missing_file_with_its_key_and_line(tmp_path: Path) -> None:
    """Every file a backup would fail on is a problem naming its key and line."""
    text = policy_naming_files(tmp_path)
    with pytest.raises(ConfigError) as caught:
        config.parse(text, "policy.yaml", {}, check_files=True)
    assert caught.value.exit_code == ExitCode.CONFIG
    hint = " (optional: true allows that)"
    assert caught.value.problems == (
        f"policy.yaml:2: sources.redis.password_file: {tmp_path}/redis-password does not exist",
        f"policy.yaml:3: sources.sqlite[0]: {tmp_path}/app.db does not exist{hint}",
        f"policy.yaml:4: sources.config[0]: {tmp_path}/.env does not exist{hint}",
        f"policy.yaml:5: sources.dirs[0]: {tmp_path}/data does not exist{hint}",
        f"policy.yaml:7: encryption.gpg.public_keys_file: {tmp_path}/public.asc does not exist",
        f"policy.yaml:9: remotes[0].identity_file: {tmp_path}/id_ed25519 does not exist",
    )


def test_check_files_passes_when_every_file_is_there_and_optional_ones_may_be_missing(
    tmp_path: Path,
) -> None:
    """Present files of the right kind pass; an optional source may be absent."""
    for name in ("redis-password", "app.db", ".env", "public.asc", "id_ed25519"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "data").mkdir()
    text = policy_naming_files(tmp_path)
    assert config.parse(text, "policy.yaml", {}, check_files=True) == parse(text)


def test_check_files_refuses_a_directory_where_a_file_belongs(tmp_path: Path) -> None:
    """A directory named as the SQLite database is reported as not a file."""
    (tmp_path / "app.db").mkdir()
    problems = problems_of_files(f"sources: {{sqlite: [{tmp_path}/app.db]}}\n")
    assert problems == (f"policy.yaml:1: sources.sqlite[0]: {tmp_path}/app.db is not a file",)


def test_check_files_refuses_a_missing_passphrase_file(tmp_path: Path) -> None:
    """A passphrase_file that is not there fails check-config, not the first backup."""
    problems = problems_of_files(
        MINIMAL.replace("/srv/data", str(tmp_path))
        + f"encryption: {{gpg: {{passphrase_file: {tmp_path}/passphrase}}}}\n"
    )
    assert problems == (
        f"policy.yaml:3: encryption.gpg.passphrase_file: {tmp_path}/passphrase does not exist",
    )


def problems_of_files(text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        config.parse(text, "policy.yaml", {}, check_files=True)
    return caught.value.problems


def test_validation_alone_never_looks_at_the_disk(tmp_path: Path) -> None:
    """Without check_files, a policy naming absent files loads (the reference needs that)."""
    assert parse(policy_naming_files(tmp_path)).sources.sqlite[0].path == tmp_path / "app.db"


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "3000-deep nesting",
            "sources:\n  dirs: " + "[" * 3000 + "]" * 3000 + "\n",
            ":2: not valid YAML: exceeded maximum nesting depth",
        ),
        (
            "5000-digit integer",
            MINIMAL + "workers: " + "9" * 5000 + "\n",
            ":3: a number longer than 32 characters in a policy",
        ),
        (
            "missing password file",
            "sources:\n  redis: {password_file: /nonexistent/redis-password}\n",
            ":2: sources.redis.password_file: /nonexistent/redis-password does not exist",
        ),
    ],
)
def test_check_config_refuses_a_hostile_policy_with_one_line_and_exit_78(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    """The real command prints one config error line (never a traceback) and exits 78."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    result = run_cli("check-config", config=policy, timeout=60)
    assert result.returncode == ExitCode.CONFIG, name
    assert result.stderr_lines == [f"sovbackupd: config error: {policy}{expected}"], name
    assert result.stdout == ""


# Red-team findings: each of these crashed, hung or misled before its fix.


@pytest.mark.parametrize(
    "text",
    [
        'sources: {dirs: ["/srv/a\\0b"]}\n',
        'sources: {dirs: [/srv]}\nbackup_dir: "/srv/b\\0k"\n',
        'sources: {dirs: [/srv]}\nmetrics: {listen: "127.0.0.1\\0:9877"}\n',
        'sources: {dirs: [/srv]}\nhooks: {before_backup: [["true\\0"]]}\n',
    ],
)
def test_a_nul_character_in_any_value_is_refused_at_its_line(text: str) -> None:
    """A NUL escape made a path that os.stat, bind and exec raise ValueError on."""
    line, _ = refusal(text)
    assert line.startswith(f"policy.yaml:{text.count(chr(10))}: NUL characters"), line


def test_a_control_character_is_one_error_line_naming_its_line() -> None:
    """The reader error of libyaml spanned two lines and named no line of the file."""
    line, _ = refusal(MINIMAL + "workers: 2\x00\n")
    assert line.startswith("policy.yaml:3: not valid YAML: unacceptable character #x0000"), line
    assert "\n" not in line


@pytest.mark.parametrize("value", ["9" * 5000, "100001", "1" + "0" * 40])
def test_retention_days_out_of_bounds_names_the_variable(value: str) -> None:
    """5000 digits raised ValueError from int(); 100001 was blamed on line 1 of the policy."""
    problems = problems_of(MINIMAL, {"RETENTION_DAYS": value})
    assert len(problems) == 1
    assert problems[0].startswith(
        "RETENTION_DAYS (environment): must be a whole number of days from 0 to 100000, not "
    )
    assert len(problems[0]) < 200


@pytest.mark.parametrize(("value", "keep"), [("100000", 100_000), ("0" * 40 + "7", 7)])
def test_retention_days_within_the_bound_loads(value: str, keep: int) -> None:
    """The largest keep is accepted from the environment as from the policy."""
    policy = parse(MINIMAL, {"RETENTION_DAYS": value})
    assert policy.tiers.daily is not None
    assert policy.tiers.daily.keep == keep


def test_a_policy_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Opening a FIFO blocks until a writer comes: check-config and SIGHUP hung on one."""
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    result = run_cli("check-config", config=fifo, timeout=60)
    assert result.returncode == ExitCode.CONFIG
    assert result.stderr_lines == [
        f"sovbackupd: config error: policy file {fifo} is not a regular file"
    ]


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:notaport/0",
        "redis://127.0.0.1:99999/0",
        "redis://127.0.0.1/0?socket_timeout=soon",
        "redis://[::1/0",
        "unix:///run/redis.sock?db=first",
    ],
)
def test_a_redis_url_redis_py_cannot_parse_is_a_config_error(url: str) -> None:
    """These passed check-config, then every backup raised ValueError from from_url."""
    problems = problems_of(f"sources:\n  redis: {{url: '{url}'}}\n")
    assert len(problems) == 1
    assert problems[0].startswith("policy.yaml:2: sources.redis.url: "), problems
    assert "cannot be used: " in problems[0]


@pytest.mark.parametrize(
    ("section", "expression"),
    [
        ("tiers:\n  daily: {{schedule: '{}', keep: 1}}", "0 0 31 2 *"),
        ("tiers:\n  daily: {{schedule: '{}', keep: 1}}", "0 0 30 2 *"),
        ("tiers:\n  daily: {{schedule: '{}', keep: 1}}", "0 0 31 4,6,9,11 *"),
        ("test_restore:\n  schedule: '{}'", "0 5 31 2 *"),
    ],
)
def test_a_schedule_that_never_fires_is_a_config_error(section: str, expression: str) -> None:
    """February 31 passed check-config; the daemon then ran that tier once at start, never again."""
    where = "tiers.daily.schedule" if section.startswith("tiers") else "test_restore.schedule"
    assert problems_of(f"{MINIMAL}{section.format(expression)}\n") == (
        f"policy.yaml:4: {where}: cron expression {expression!r} never fires: "
        "no month has that day",
    )


@pytest.mark.parametrize(
    "expression", ["0 0 29 2 *", "0 0 31 2 mon", "0 0 31 * *", "0 0 last 2 *", "* * * * * *"]
)
def test_a_schedule_that_fires_rarely_or_often_still_loads(expression: str) -> None:
    """Leap days fire every four years, and a weekday rescues day 31 of February."""
    policy = parse(f"{MINIMAL}tiers:\n  daily: {{schedule: '{expression}', keep: 1}}\n")
    assert policy.tiers.daily is not None


def test_a_path_with_a_newline_is_quoted_so_it_cannot_forge_an_error_line(
    tmp_path: Path,
) -> None:
    """A newline in a missing path split its error in two, the second line the file's own."""
    policy = tmp_path / "policy.yaml"
    forged = f"{tmp_path}/a\nsovbackupd: check-config: the policy is valid\r"
    policy.write_text(yaml.safe_dump({"sources": {"dirs": [forged], "sqlite": [forged + ".db"]}}))
    result = run_cli("check-config", config=policy, timeout=60)
    assert result.returncode == ExitCode.CONFIG
    assert result.stderr.count("\n") == 2, result.stderr
    assert "\r" not in result.stderr
    assert result.stderr_lines[0].endswith(
        f"sources.dirs[0]: {forged!r} does not exist (optional: true allows that)"
    ), result.stderr


@pytest.mark.parametrize(
    "text",
    [
        "<<: {workers: 64}\nworkers: 2\n" + MINIMAL,
        "sources:\n  <<: {dirs: [/srv]}\n",
        "workers: <<\n" + MINIMAL,
    ],
)
def test_merge_keys_are_refused_at_their_line(text: str) -> None:
    """`<<` silently merged keys, and a key repeated through it was blamed on the wrong line."""
    line, _ = refusal(text)
    first = next(number for number, row in enumerate(text.splitlines(), 1) if "<<" in row)
    assert line == f"policy.yaml:{first}: merge keys (<<) are not allowed in a policy", line


def test_a_name_prefix_too_long_for_a_file_name_is_a_config_error(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """A 300-character prefix passed check-config, then every backup raised ENAMETOOLONG."""
    policy = tmp_path / "policy.yaml"
    for prefix, code in (("p" * 300, ExitCode.CONFIG), ("p" * MAX_PREFIX_CHARS, ExitCode.OK)):
        write_policy(policy, policy_data(sandbox, None, name_prefix=prefix, compression="zstd"))
        result = run_cli("backup", config=policy, timeout=120)
        assert result.returncode == code, result.stderr
        if code == ExitCode.CONFIG:
            assert len(result.stderr_lines) == 1, result.stderr
            assert "name_prefix: String should have at most 200 characters" in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "sources: {dirs: [/srv/data/..]}\n",
            "policy.yaml:1: sources.dirs[0]: must not contain '..', not '/srv/data/..': "
            "name the directory itself",
        ),
        (
            "sources: {sqlite: [/srv/../app.db]}\n",
            "policy.yaml:1: sources.sqlite[0]: must not contain '..', not '/srv/../app.db': "
            "name the directory itself",
        ),
        (
            "sources: {dirs: [/]}\n",
            "policy.yaml:1: sources.dirs[0]: must not be / itself: a source is archived "
            "under its basename",
        ),
    ],
)
def test_a_source_path_without_a_usable_basename_is_a_config_error(
    text: str, expected: str
) -> None:
    """`/srv/data/..` archived members as NAME/../f, outside the top: every verify failed."""
    assert problems_of(text) == (expected,)


# Layouts whose backups could not be restored (issue 13).


@pytest.mark.parametrize(
    ("backup_dir", "relation"),
    [("/a/data/backups", "is inside"), ("/a/data", "is the same path as")],
)
def test_backup_dir_inside_a_data_dir_is_refused_naming_both(
    backup_dir: str, relation: str
) -> None:
    """A backup_dir in a data dir would archive every earlier backup into each new one."""
    problems = problems_of(f"backup_dir: {backup_dir}\nsources:\n  dirs: [/b/memory, /a/data]\n")
    assert problems == (
        f"policy.yaml:2: sources: backup_dir {backup_dir} {relation} sources.dirs[1] /a/data: "
        "every backup would archive the earlier ones, and restoring it would delete the "
        "newer ones",
    )


@pytest.mark.parametrize(
    ("sources", "key", "path"),
    [
        ("dirs: [/srv/backups/data]", "sources.dirs[0]", "/srv/backups/data"),
        ("config: [/srv/backups/.env]", "sources.config[0]", "/srv/backups/.env"),
        ("sqlite: [/srv/backups/app.db]", "sources.sqlite[0]", "/srv/backups/app.db"),
        (
            "redis: {rdb_path: /srv/backups/dump.rdb}",
            "sources.redis.rdb_path",
            "/srv/backups/dump.rdb",
        ),
        ("redis: {aof_dir: /srv/backups}", "sources.redis.aof_dir", "/srv/backups"),
    ],
)
def test_a_source_of_any_kind_inside_backup_dir_is_refused(
    sources: str, key: str, path: str
) -> None:
    """Live data inside backup_dir is archived by its own backups and managed by retention."""
    problems = problems_of(f"backup_dir: /srv/backups\nsources:\n  {sources}\n")
    assert len(problems) == 1
    assert problems[0].startswith(
        f"policy.yaml:2: sources: {key} {path} "
        + ("is the same path as" if path == "/srv/backups" else "is inside")
        + " backup_dir /srv/backups: "
    )


@pytest.mark.parametrize(
    ("dirs", "expected"),
    [
        ("[/a/data, /a/data/sub]", "sources.dirs[1] /a/data/sub is inside sources.dirs[0] /a/data"),
        ("[/a/data/sub, /a/data]", "sources.dirs[1] /a/data contains sources.dirs[0] /a/data/sub"),
        (
            "[/a/data, /b/x, /a/data/deep/er]",
            "sources.dirs[2] /a/data/deep/er is inside sources.dirs[0] /a/data",
        ),
    ],
)
def test_a_data_dir_inside_another_is_refused_in_either_order(dirs: str, expected: str) -> None:
    """Nested data dirs are archived twice, and no full restore can put both back."""
    assert problems_of(f"backup_dir: /b/backups\nsources:\n  dirs: {dirs}\n") == (
        f"policy.yaml:2: sources: {expected}: it would be archived twice and no full restore "
        "could put it back",
    )


def test_backup_dir_beside_config_files_and_databases_is_accepted() -> None:
    """backup_dir in the directory of a config file or database archives nothing twice."""
    policy = parse(
        "backup_dir: /opt/app/backups\nsources:\n"
        "  config: [/opt/app/.env]\n  sqlite: [/opt/app/app.db]\n  dirs: [/opt/app/data]\n"
    )
    assert policy.backup_dir == Path("/opt/app/backups")


def test_a_config_file_may_be_named_like_a_top_level_archive_entry() -> None:
    """Config files live under config/, so /etc/selinux/config collides with nothing."""
    policy = parse("sources:\n  config: [/etc/selinux/config, /srv/app/manifest.json]\n")
    assert [entry.path.name for entry in policy.sources.config] == ["config", "manifest.json"]


@pytest.mark.parametrize(
    ("backup_dir", "reason"),
    [
        ("/", "the root directory"),
        ("/tmp", "world-writable and cleaned by the system"),
        ("/tmp/", "world-writable and cleaned by the system"),
        ("//tmp", "world-writable and cleaned by the system"),
        ("/var/tmp", "world-writable and cleaned by the system"),
        ("/etc", "a system directory"),
        ("/usr", "a system directory"),
        ("/lib64", "a system directory"),
        ("/var", "a system directory"),
        ("/run/backups", "tmpfs, emptied at every boot"),
        ("/proc/1", "a kernel file system, not storage"),
        ("/dev/shm/backups", "device nodes and shared memory, not storage"),
        ("/var/backups/../../etc", "a system directory"),
    ],
)
def test_backup_dir_on_a_system_directory_is_refused(backup_dir: str, reason: str) -> None:
    """/, /tmp, /etc, /run/... are no place for the only copy of a server's backups."""
    (problem,) = problems_of(f"backup_dir: {backup_dir}\n{MINIMAL}")
    assert problem.startswith("policy.yaml:1: backup_dir: must not be ")
    assert f": it is {reason}; use a directory of its own" in problem


@pytest.mark.parametrize("backup_dir", ["/var/backups/sovereigncore", "/srv/backups", "/tmp/x"])
def test_backup_dir_below_an_ordinary_directory_is_accepted(backup_dir: str) -> None:
    """Only the system directories themselves (and what is below /proc, /sys, /dev, /run)."""
    assert parse(f"backup_dir: {backup_dir}\n{MINIMAL}").backup_dir == Path(backup_dir)


def test_backup_dir_from_the_environment_on_a_system_directory_names_the_variable() -> None:
    """BACKUP_DIR=/tmp is refused as BACKUP_DIR, not as the policy's own line."""
    assert problems_of(MINIMAL, {"BACKUP_DIR": "/tmp"}) == (
        "BACKUP_DIR (environment): must not be /tmp: it is world-writable and cleaned by "
        "the system; use a directory of its own, e.g. /var/backups/sovereigncore",
    )
