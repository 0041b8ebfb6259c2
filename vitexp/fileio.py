"""The one way vitexp writes a file (`atomic_write`), and the temporary names it uses."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import socket
from pathlib import Path
from typing import BinaryIO, Callable

import pandas as pd

from vitexp.errors import UserError

TMP_SUFFIX = ".tmp"


class DiskFull(UserError):
    """No space left where vitexp writes: nothing more can be recorded."""


def tmp_path(path: Path) -> Path:
    """The temporary name a writer of `path` uses before its rename: hidden, and
    naming the writer (host, pid) so leftovers of a killed writer can be swept."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}{TMP_SUFFIX}")


def _tmp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a tmp_path name of this host, None for any other name."""
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    head, _, pid = name[: -len(TMP_SUFFIX)].rpartition(".")
    host = socket.gethostname()
    if not pid.isdigit() or not head.endswith("." + host):
        return None
    return host, int(pid)


def atomic_write(path: Path, content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """The one way vitexp writes a file: to a temporary name, synced, then renamed over
    PATH, so a kill leaves the old file or the new one, never half of one. CONTENT is the
    text or bytes, or a function that writes into a binary file (torch.save, a figure);
    its output is gathered in memory first, so a full disk surfaces here as DiskFull.
    Content identical to the file's leaves it untouched (a rerun with nothing to do
    changes no file)."""
    path = Path(path)
    if callable(content):
        buf = io.BytesIO()
        content(buf)
        data = buf.getvalue()
    else:
        data = content.encode() if isinstance(content, str) else content
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on the device of {path.parent} (writing {path.name}); "
                           f"free some space and rerun the same command to resume") from None
        raise


def atomic_write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, df.to_csv(index=False))
