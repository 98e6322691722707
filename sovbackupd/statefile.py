"""Small JSON state files kept beside the backups: bounded, validated, written atomically.

sovbackupd remembers a few facts across restarts in ``backup_dir`` (the last test
restore's result, for one). Anything on disk may be damaged or planted, so a state file
is read as untrusted input: a size bound, a regular file only (a FIFO would block the
reader), and a pydantic model that it must match. A file that fails any of these is
logged once, as ``state.ignored`` naming it and why, and treated as absent: the daemon
starts without that fact rather than not at all, and the next write replaces the file.

Define a state as a subclass of :class:`State`; read it with :func:`read` and write it
with :func:`write`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from sovbackupd import archive, untrusted

log = structlog.get_logger("sovbackupd.statefile")

MAX_STATE_BYTES = 64 << 10  # a state file holds a few numbers and names

StateT = TypeVar("StateT", bound="State")


class State(BaseModel):
    """Base of the state models: strict types, finite numbers, frozen.

    Strict, so that ``"last_success": "yesterday"`` or ``"ok": "no"`` is refused rather
    than coerced; unknown keys are ignored, so that a newer version's file still reads.
    """

    model_config = ConfigDict(strict=True, frozen=True, allow_inf_nan=False, extra="ignore")


def first_problem(error: ValidationError) -> str:
    """Return the first problem of a validation *error* as ``where: what``."""
    detail = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in detail["loc"])
    return f"{where}: {detail['msg']}" if where else detail["msg"]


def read_bounded(path: Path, limit: int) -> bytes:
    """Return the bytes of the regular file *path*, at most *limit* of them.

    Never block and never follow: a FIFO, a device or a symlink planted at *path* raises
    ValueError or OSError (ELOOP), as does a file over *limit* bytes.
    """
    with untrusted.open_regular(path) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


def read(path: Path, model: type[StateT], limit: int = MAX_STATE_BYTES) -> StateT | None:
    """Return the state saved at *path* as a *model*; None when it is missing or unusable.

    Unusable means unreadable, not a regular file, over *limit* bytes, not JSON, or not
    shaped like *model*: one ``state.ignored`` warning names the file and the reason.
    """
    try:
        return model.model_validate_json(read_bounded(path, limit))
    except FileNotFoundError:
        return None
    except OSError as error:
        reason = error.strerror or str(error)
    except ValidationError as error:
        reason = first_problem(error)
    except ValueError as error:
        reason = str(error)
    log.warning("state.ignored", path=str(path), reason=reason)
    return None


def write(path: Path, state: State) -> None:
    """Save *state* at *path* atomically (temp file, fsync, rename); raise OSError."""
    archive.write_atomically(path, state.model_dump_json().encode())
