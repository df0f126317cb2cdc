"""What a device holds that it has not trained on: what tells a scheduled run it has work.

When a round has trained on the device's own samples' folder, the ClientApp records each file it
saw there by name, size and modification time (`trained-data.json` in the state folder); a
device that trains on a built-in partition records an empty list (its data never changes). The
agent counts the samples of every file not recorded as it is now (new, or changed since):
`.npz` from the `x` member's header, `.csv` by its lines, each file counted once while it stays
the same. Standard library only: the agent imports this.
"""

from __future__ import annotations

import ast
import functools
import json
import zipfile
from pathlib import Path

from skip2fleet.shared.atomic import write_text_atomic

TRAINED_DATA = "trained-data.json"  # in the state folder
SUFFIXES = (".npz", ".csv")  # as shared/datasets/samples.py reads
FileKey = tuple[str, int, int]  # name, size, modification time (ns)


def seen_files(folder: Path | None) -> list[FileKey]:
    """The sample files in `folder` (or the one file it names) as they are now; none for a
    built-in partition."""
    if folder is None:
        return []
    if folder.is_file():
        files = [folder]
    elif folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file())
    else:
        return []
    return [(p.name, (s := p.stat()).st_size, s.st_mtime_ns) for p in files]


def record_trained(state_dir: Path, files: list[FileKey]) -> None:
    """After a round trained: these files (as they were when the round read them) are known."""
    text = json.dumps({"files": [list(key) for key in files]}) + "\n"
    write_text_atomic(state_dir / TRAINED_DATA, text)


def untrained_samples(state_dir: Path, folder: Path | None) -> int | None:
    """Samples in `folder` no round has trained on; None when nothing is known (a device on a
    built-in partition that has not trained yet). A record that cannot be read counts as none."""
    try:
        record = json.loads((state_dir / TRAINED_DATA).read_text())
        trained = {tuple(key) for key in record["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        trained = None
    if folder is None:
        return None if trained is None else 0
    where = folder.parent if folder.is_file() else folder
    return sum(
        count_samples(where / key[0], *key[1:])
        for key in seen_files(folder)
        if key not in (trained or set())
    )


@functools.lru_cache(maxsize=4096)
def count_samples(path: Path, size: int, mtime_ns: int) -> int:
    """Samples in one file (size and time are the cache's key); 0 when it cannot be read (the
    round that reads it names the problem)."""
    try:
        if path.suffix == ".csv":
            with path.open("rb") as handle:
                lines = sum(1 for line in handle if line.strip())
            return max(lines - 1, 0)  # the header
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as member:
            return _npy_rows(member.read(1024))
    except (OSError, ValueError, KeyError, SyntaxError, zipfile.BadZipFile):
        return 0


def _npy_rows(head: bytes) -> int:
    """The first dimension from a .npy header (format versions 1 to 3)."""
    if not head.startswith(b"\x93NUMPY"):
        raise ValueError("not a .npy member")
    width = 2 if head[6] == 1 else 4
    length = int.from_bytes(head[8 : 8 + width], "little")
    header = ast.literal_eval(head[8 + width : 8 + width + length].decode("latin1"))
    return int(header["shape"][0]) if header["shape"] else 1
