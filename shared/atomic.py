"""Write files whole or not at all: into a temporary file beside the target, then rename.

The file gets its mode before it has its name: 0644 for what other users and services read (a
report, Prometheus' configuration), 0600 for secrets (keys, passwords), never readable by others
in between."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], mode: int = 0o644) -> Path:
    """Call `write` with a binary file that becomes `path` (with `mode`) only if `write` returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> Path:
    return write_atomic(path, lambda handle: handle.write(text.encode()), mode)
