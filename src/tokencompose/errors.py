"""The one error type for user mistakes, and how the CLI reports it.

A :class:`UserError` is a problem with what the user asked for or handed us (a path that does not
exist, a bad name, an unusable folder, a full disk): the CLI prints its message on one line and exits
with status 2, no traceback. Any other exception is a bug and keeps its traceback. Library code raises
``UserError`` (or a subclass such as :class:`tokencompose.typed_data.ConfigError`) with a message that
names the input and says what to do.
"""

from __future__ import annotations

import errno

# OS errors that describe the user's environment, not a bug: reported on one line, exit 2.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "No space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
}


class UserError(Exception):
    """A mistake in the user's input or environment; the CLI prints ``str(err)`` and exits 2."""


def one_line(message: str) -> str:
    """``message`` folded onto one line (CLI errors are one line)."""
    return " ".join(str(message).split())


def environment_error_message(err: OSError) -> str | None:
    """A one-line message for an OS error caused by the environment (disk full, read-only...), else None."""
    reason = _ENVIRONMENT_ERRNOS.get(err.errno or -1)
    if reason is None:
        return None
    where = err.filename if err.filename is not None else ""
    hint = {
        errno.ENOSPC: "free some space or choose another output folder",
        errno.EDQUOT: "free some space or choose another output folder",
    }.get(err.errno or -1, "choose a folder you can write to")
    return one_line(f"{reason}: {where} ({hint})" if where else f"{reason} ({hint})")
