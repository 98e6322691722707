"""The encryption section of a policy: exactly one way to encrypt, reported with its path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sovbackupd import config
from sovbackupd.config.models import Policy
from sovbackupd.errors import ConfigError, ExitCode

SOURCES = "sources: {dirs: [/srv/data]}\n"
ONE_MODE = "set exactly one of passphrase_file, passphrase_credential, recipients"


def parse(encryption: str) -> Policy:
    text = SOURCES + "encryption:\n" + textwrap.indent(textwrap.dedent(encryption), "  ")
    return config.parse(text, "policy.yaml", {})


def problems_of(encryption: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        parse(encryption)
    assert caught.value.exit_code == ExitCode.CONFIG
    return caught.value.problems


def test_no_encryption_is_the_default() -> None:
    """A policy without an encryption section stores archives unencrypted."""
    assert config.parse(SOURCES, "policy.yaml", {}).encryption is None


def test_passphrase_file_selects_symmetric_encryption() -> None:
    """`gpg: {passphrase_file: ...}` loads with no recipients."""
    policy = parse("gpg: {passphrase_file: /etc/sovbackupd/passphrase}\n")
    assert policy.encryption is not None
    assert policy.encryption.gpg.passphrase_file == Path("/etc/sovbackupd/passphrase")
    assert policy.encryption.gpg.recipients == []


def test_passphrase_credential_names_a_systemd_credential() -> None:
    """`passphrase_credential` takes a credential name."""
    policy = parse("gpg: {passphrase_credential: backup-passphrase}\n")
    assert policy.encryption is not None
    assert policy.encryption.gpg.passphrase_credential == "backup-passphrase"  # noqa: S105 (a name)


def test_recipients_load_with_their_public_keys_file() -> None:
    """Public-key mode takes recipients, their key file, and optional restore keys."""
    policy = parse(
        """\
        gpg:
          recipients: [" 415F2E4BF9DD37FA6A6E731BFBEA67085C14ACA1 "]
          public_keys_file: /etc/sovbackupd/recipients.asc
          secret_keys_file: /root/recovery/secret.asc
          secret_key_passphrase_file: /root/recovery/key-passphrase
        """
    )
    assert policy.encryption is not None
    gpg = policy.encryption.gpg
    assert gpg.recipients == ["415F2E4BF9DD37FA6A6E731BFBEA67085C14ACA1"]
    assert gpg.public_keys_file == Path("/etc/sovbackupd/recipients.asc")
    assert gpg.secret_keys_file == Path("/root/recovery/secret.asc")


@pytest.mark.parametrize(
    ("encryption", "given"),
    [
        ("gpg: {}\n", "none of them"),
        ("gpg: {recipients: []}\n", "none of them"),
        (
            "gpg: {passphrase_file: /etc/p, passphrase_credential: p}\n",
            "passphrase_file and passphrase_credential",
        ),
        (
            "gpg: {passphrase_file: /etc/p, recipients: [ABCD], public_keys_file: /etc/k.asc}\n",
            "passphrase_file and recipients",
        ),
    ],
)
def test_exactly_one_mode_must_be_set(encryption: str, given: str) -> None:
    """None, or two, of passphrase_file/passphrase_credential/recipients is one clear error."""
    (problem,) = problems_of(encryption)
    assert problem.startswith("policy.yaml:")
    assert ": encryption.gpg: " in problem
    assert problem.endswith(f"{ONE_MODE} (got {given})")


def test_recipients_without_public_keys_file_are_refused() -> None:
    """Recipients need the file their public keys are imported from."""
    (problem,) = problems_of("gpg: {recipients: [ABCD1234]}\n")
    assert problem.endswith(
        "encryption.gpg: recipients need public_keys_file, the public keys to encrypt to"
    )


def test_key_files_are_refused_with_a_passphrase() -> None:
    """Key files mean nothing in passphrase mode, and saying so beats ignoring them."""
    (problem,) = problems_of(
        "gpg: {passphrase_file: /etc/p, public_keys_file: /etc/k.asc, secret_keys_file: /s}\n"
    )
    assert problem.endswith("public_keys_file, secret_keys_file only apply with recipients")


def test_relative_passphrase_file_is_refused() -> None:
    """Like every path in a policy, passphrase_file must be absolute."""
    (problem,) = problems_of("gpg: {passphrase_file: passphrase}\n")
    assert "encryption.gpg.passphrase_file: must be an absolute path" in problem


@pytest.mark.parametrize("name", ["../passphrase", "a/b", "..", ""])
def test_credential_name_is_one_path_component(name: str) -> None:
    """A credential name cannot climb out of $CREDENTIALS_DIRECTORY."""
    (problem,) = problems_of(f'gpg: {{passphrase_credential: "{name}"}}\n')
    assert "encryption.gpg.passphrase_credential: must be a credential name" in problem


def test_empty_recipient_is_refused() -> None:
    """An empty string is not a key id."""
    problems = problems_of('gpg: {recipients: [""], public_keys_file: /etc/k.asc}\n')
    assert any("encryption.gpg.recipients[0]: must be a key id" in line for line in problems)


def test_unknown_key_in_gpg_is_named() -> None:
    """A typo inside the gpg section is an unknown key at its path."""
    problems = problems_of("gpg: {passphrase_file: /etc/p, pasphrase: x}\n")
    assert any("encryption.gpg.pasphrase: unknown key" in line for line in problems)
