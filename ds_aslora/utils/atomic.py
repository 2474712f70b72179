"""Writes that never leave a half-written file under the final name."""
from __future__ import annotations

import os
import socket
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)``, flushed to disk, then renamed into ``path`` (atomic on POSIX) and
    the folder flushed: a crash, even of the machine, leaves the old file or the new one."""
    # Host and pid: ranks on different nodes can share a pid and a filesystem.
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    """``atomic_write`` of a text file."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def fsync_path(path: str) -> None:
    """Flush a file or folder to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
