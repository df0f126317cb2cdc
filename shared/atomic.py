"""Write files whole or not at all: into a temporary file beside the target, then rename; and
check, before long work, that its output can be written at all.

The file gets its mode before it has its name: 0644 for what other users and services read (a
report, Prometheus' configuration), 0600 for secrets (keys, passwords), never readable by others
in between."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from skip2fleet.shared.errors import FleetError


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


def check_writable(path: Path, folder: bool = False) -> Path:
    """`path` if a file (with `folder`, files in a folder) can be written there, else a
    `FleetError` naming it: checked before the work whose result would be lost. It tries, with a
    nameless temporary file in the nearest folder that exists (root may write where the mode
    bits say no, and /proc refuses whatever they say); nothing is left behind."""
    path = Path(path).expanduser()
    if path.is_dir() and not folder:
        raise FleetError(f"{path}: is a folder; name a file to write")
    if path.exists() and not path.is_dir() and folder:
        raise FleetError(f"{path}: is a file; name a folder to write into")
    nearest = path if path.is_dir() else path.parent
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise FleetError(f"{path}: cannot be written, {nearest} is a file")
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as exc:
        raise FleetError(f"{path}: cannot be written in {nearest} ({exc.strerror})") from None
    return path
