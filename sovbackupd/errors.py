"""The exception family and the exit-code table.

Every failure that an operator can cause or fix (a bad policy, an unreachable Redis, a
full disk) is a :class:`SovbackupdError`: the CLI prints its message as one line on
stderr and exits with its code, never with a traceback. Anything else is a bug.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes, from sysexits.h where one fits."""

    OK = 0
    FAILURE = 1  # a backup, a source or a verification failed
    USAGE = 2  # bad command-line arguments (argparse's own code)
    NOT_STARTED = 69  # EX_UNAVAILABLE: the data is restored, but restore.start failed
    UNAUTHENTICATED = 65  # EX_DATAERR: a backup's authentication record is missing or fails
    CANT_CREATE = 73  # EX_CANTCREAT: the backup directory cannot take the archive
    TEMPFAIL = 75  # EX_TEMPFAIL: try again later: another writer holds the lock, a remote is down
    CONFIG = 78  # EX_CONFIG: systemd's RestartPreventExitStatus keys on this
    INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C; SIGTERM too
    CLOSED_PIPE = 141  # 128 + SIGPIPE: the reader of the output left early (list | head -1)


class SovbackupdError(Exception):
    """An expected failure with a one-line message for the operator."""

    exit_code: ExitCode = ExitCode.FAILURE


class UsageError(SovbackupdError):
    """A command-line argument that parses but cannot be used (a past time, a vast span)."""

    exit_code = ExitCode.USAGE


class ConfigError(SovbackupdError):
    """The policy file is missing, unreadable or invalid."""

    exit_code = ExitCode.CONFIG

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        """Carry the headline *message* and every individual problem found."""
        super().__init__(message)
        self.problems = problems


class SourceError(SovbackupdError):
    """A source (Redis, SQLite, a file or directory) could not be captured."""


class ArchiveError(SovbackupdError):
    """An archive could not be written, read or verified."""


class DiskSpaceError(SovbackupdError):
    """The backup directory does not have room for the backup."""

    exit_code = ExitCode.CANT_CREATE


class LockedError(SovbackupdError):
    """Another sovbackupd process is writing to the same backup directory."""

    exit_code = ExitCode.TEMPFAIL


class AbortedError(SovbackupdError):
    """A running backup was stopped: shutdown past its grace, or its time bound."""


class HookError(SovbackupdError):
    """A before_backup hook failed, so the backup did not start."""


class RestoreError(SovbackupdError):
    """A restore was refused or could not finish; what it swapped was put back."""


class UnsafePathError(RestoreError):
    """A path restore would write through is a symlink, moved, or open to every user."""


class AuthError(ArchiveError):
    """A backup is not authenticated by our key, or its record does not hold: a forgery."""

    exit_code = ExitCode.UNAUTHENTICATED


class NotFoundError(SovbackupdError):
    """A named backup does not exist."""


class CryptoError(SovbackupdError):
    """gpg could not encrypt or decrypt: a wrong passphrase, a missing key, a damaged file."""


class TargetError(SovbackupdError):
    """A remote copy failed in a way that retrying will not fix.

    Bad credentials, an unknown host key, a missing bucket, or a local file that does not
    match its recorded checksum: an operator has to act.
    """


class TransientTargetError(TargetError):
    """A remote was unreachable or dropped the connection; a later attempt may succeed."""

    exit_code = ExitCode.TEMPFAIL
