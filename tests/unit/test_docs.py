"""The operator's guide keeps its promises: every seed procedure is mapped."""

from __future__ import annotations

import itertools
import shlex
from pathlib import Path

import yaml

from tests.conftest import run_cli, write_policy

GUIDE = Path(__file__).parents[2] / "docs" / "index.md"
SEPARATOR = " \N{SINGLE RIGHT-POINTING ANGLE QUOTATION MARK} "

# The headings of the seed's BACKUP_AND_RECOVERY.md (which lives outside this repo).
SEED_SECTIONS = (
    "Overview",
    "Backup Strategy",
    "Automated Backups",
    "Manual Backup",
    "Backup Configuration",
    "Backup Contents",
    "Recovery Procedures",
    "Full System Restore",
    "Partial Recovery",
    "Restore Redis Only",
    "Restore Database Only",
    "Restore Configuration Only",
    "Remote Backup",
    "Using rsync",
    "Using AWS S3",
    "Using Google Cloud Storage",
    "Disaster Recovery Plan",
    "Scenario 1: Data Corruption",
    "Scenario 2: Complete System Failure",
    "Scenario 3: Accidental Deletion",
    "Testing Backups",
    "Monitoring Backups",
    "Check Backup Status",
    "Backup Alerts",
    "Retention Policy",
    "Security Considerations",
    "Encrypting Backups",
    "Troubleshooting",
    "Backup Fails",
    "Restore Fails",
    "Backup Too Large",
    "References",
)


def mapped_sections() -> list[str]:
    """Return the first cell of each row of the guide's seed mapping table."""
    text = GUIDE.read_text()
    table = text[text.index("## Seed procedures mapped to sovbackupd") :]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    return [row.split(" | ")[0].removeprefix("| ") for row in rows[2:]]


def headings(cell: str) -> list[str]:
    """Return the seed headings a row names: "A, then B (what it did)" names A and B."""
    return cell.split(" (", maxsplit=1)[0].split(SEPARATOR)


def test_every_seed_section_has_a_row_in_the_mapping_table() -> None:
    """Each heading of the seed document names a row of docs/index.md's mapping table."""
    cells = mapped_sections()
    missing = [
        section for section in SEED_SECTIONS if not any(section in headings(cell) for cell in cells)
    ]
    assert missing == []


def test_every_row_points_at_a_command_or_setting() -> None:
    """No row of the mapping table is left without what does it now."""
    text = GUIDE.read_text()
    table = text[text.index("## Seed procedures mapped to sovbackupd") :]
    rows = [line for line in table.splitlines() if line.startswith("| ")][2:]
    assert rows
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert len(cells) == 2, row
        assert "`" in cells[1] or "](" in cells[1], row


def documented_simulations() -> list[tuple[str, list[str], list[str]]]:
    """Return each `$ sovbackupd retention simulate ...` in docs/: file, argv, printed lines.

    A trailing `| tail -N` is kept as the last element of argv, to apply to the output.
    """
    found = []
    for page in sorted(GUIDE.parent.glob("*.md")):
        for block in page.read_text().split("```console\n")[1:]:
            lines = block.split("```", maxsplit=1)[0].splitlines()
            for index, line in enumerate(lines):
                if not line.startswith("$ sovbackupd retention simulate"):
                    continue
                command, _, tail = line.removeprefix("$ sovbackupd ").partition(" | ")
                printed = list(
                    itertools.takewhile(lambda out: not out.startswith("$"), lines[index + 1 :])
                )
                found.append((page.name, [*shlex.split(command), tail], printed))
    return found


def test_documented_retention_simulations_print_what_the_docs_say(tmp_path: Path) -> None:
    """Each `retention simulate` shown in docs/, run on the example policy, prints as shown."""
    example = yaml.safe_load((GUIDE.parents[1] / "config" / "policy.example.yaml").read_text())
    policy = {key: example[key] for key in ("timezone", "tiers", "retention")}
    policy.update(backup_dir=str(tmp_path / "backups"), sources={"dirs": [str(tmp_path / "data")]})
    config = write_policy(tmp_path / "policy.yaml", policy)
    runs = documented_simulations()
    assert runs, "the guide shows retention simulate"
    for page, (*argv, tail), printed in runs:
        result = run_cli(*argv, config=config)
        assert result.returncode == 0, result.stderr
        output = result.stdout.splitlines()
        if tail:
            output = output[-int(tail.removeprefix("tail -")) :]
        assert output == printed, f"{page}: $ sovbackupd {' '.join(argv)}"
