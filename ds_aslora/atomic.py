"""Writes that never leave a half-written file under the final name."""
from __future__ import annotations

import os
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)``, then rename into ``path`` (atomic on POSIX): a crash leaves
    either the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
