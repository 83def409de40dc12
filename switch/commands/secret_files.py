"""Writing key material to files an operator then points the config at.

Why a helper: a secret printed on a terminal ends up in scroll-back, shell logs and screen recordings,
and a file created with the default umask is readable by every local user. Both the KEK
(`switch keys generate-kek`) and the ledger's checkpoint seed (`switch ledger keygen`) go through here:
the file is created with mode 0600 from the first byte (O_CREAT|O_EXCL, no chmod afterwards), an
existing file is never replaced unless asked, and a replacement is written next to it and renamed
into place, so a crash leaves the old key or the new one, never half of either.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from switch.server.dirsync import sync_parent_dir

#: Mode of every key file written by the switch's commands.
SECRET_FILE_MODE = 0o600


class SecretFileError(ValueError):
    """The key file cannot be written; the message names the path, never the key."""


def write_secret_file(path: str | Path, text: str, *, force: bool = False) -> Path:
    """Create `path` with mode 0600 holding `text`; refuse an existing file unless `force`."""
    target = Path(path)
    if target.is_dir():
        raise SecretFileError(f"{target} is a directory")
    if target.exists() and not force:
        raise SecretFileError(f"{target} exists; refusing to overwrite a key file (use --force)")
    if not target.parent.is_dir():
        raise SecretFileError(f"directory {target.parent} does not exist")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
        try:
            os.fchmod(fd, SECRET_FILE_MODE)  # the umask may have narrowed it; never widened
            os.write(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails if the file appeared meanwhile: never replaced silently
            os.unlink(tmp)
        sync_parent_dir(target)
    except FileExistsError:
        raise SecretFileError(f"{target} exists; refusing to overwrite a key file (use --force)") from None
    except OSError as exc:
        raise SecretFileError(f"cannot write key file {target}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target
