"""Reading a file that holds a key: the one implementation every key loader uses.

Why one: the KEK, the ledger's PAN-hash and checkpoint keys, `switch keys seal`'s clear key and the
simulators' keys all come from files an operator points the config at, and each must be refused the
same way: readable or writable by group or others (as ssh refuses a private key -- such a key is
spent), not a regular file, too large, or not ASCII. The checks are on the file opened, not on
whatever the path names a moment later, and the bytes are checked rather than decoded, so no
exception chain can carry (or print) any of the key. A layer of its own with no switch imports, so
codec, ledger, simulators and commands can all call it (tests/test_layering.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: Largest key file read (a hex key with whitespace is far smaller).
MAX_KEY_FILE_BYTES = 4096


def read_private_file(
    path: str | Path,
    what: str,
    error: type[Exception] = ValueError,
    *,
    content: str = "hex text",
    limit: int = MAX_KEY_FILE_BYTES,
) -> str:
    """The text of `path`, or `error` whose message names `what` and the path, never the bytes.
    `content` says what the file should hold (in the message when it holds something else)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise error(
                f"{what} {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                "chmod 600 it"
            )
        raw = os.read(fd, limit + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > limit or not raw.isascii():  # checked, not caught: no file bytes in a chain
        raise error(f"{what} {path} is not {content}")
    return raw.decode("ascii")
