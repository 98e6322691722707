"""The policy file: validation, error reporting, environment overrides, rendering."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from sovbackupd import config
from sovbackupd.config.loader import SEED_DAILY_SCHEDULE
from sovbackupd.config.models import GcsRemote, Policy, RsyncRemote, S3Remote, SourcePath
from sovbackupd.errors import ConfigError, ExitCode

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
        "policy.yaml:7: tiers.daily.keep: must be a whole number >= 0 or 'unlimited'",
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
    assert problems[0].startswith("policy.yaml:4: remotes[0].url: String should match pattern")
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
