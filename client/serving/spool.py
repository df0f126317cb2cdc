"""The spool folder: a sensor process drops `.npz` or `.csv` files of samples (written elsewhere,
then renamed in, so a file is whole when it appears); each is answered once, in name order, then
moved to `done/` (or deleted, `keep=False`). A file that cannot be read or fits no sample of the
model goes to `rejected/` with `NAME.reason` beside it; the service goes on with the next.
Hidden files and names of other kinds (`x.npz.tmp`, `.x.npz`) are a writer's business: left alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from skip2fleet.shared.datasets.samples import SUFFIXES, read_blocks
from skip2fleet.shared.errors import DataError

MAX_FILE_BYTES = 64 << 20  # about 65,000 fan spectra

Answer = Callable[[str, np.ndarray], None]  # (where the samples came from, samples)


class Spool:
    def __init__(self, folder: Path, keep: bool, label_column: str = "label") -> None:
        self.folder, self.keep, self.label_column = Path(folder), keep, label_column
        for sub in ("done", "rejected"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)

    def waiting(self) -> list[Path]:
        with os.scandir(self.folder) as entries:
            names = sorted(
                e.name for e in entries
                if e.is_file() and not e.name.startswith(".") and e.name.endswith(SUFFIXES)
            )  # fmt: skip
        return [self.folder / name for name in names]

    def answer_one(self, path: Path, answer: Answer) -> str | None:
        """Answer every sample of one file, then file it away; the reason it was rejected, if.
        A file is read whole before any answer (none for a file that turns out bad), so its size
        is capped."""
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise DataError(f"larger than {MAX_FILE_BYTES >> 20} MiB; drop smaller files")
            blocks = [
                (b.where(0), b.x) for b in read_blocks(path, self.label_column, labelled=False)
            ]
            for where, x in blocks:
                answer(where, x)
        except (DataError, OSError, ValueError) as exc:
            reason = str(exc) if str(path) in str(exc) else f"{path.name}: {exc}"
            (self.folder / "rejected" / f"{path.name}.reason").write_text(reason + "\n")
            os.replace(path, self.folder / "rejected" / path.name)
            return reason
        if self.keep:
            os.replace(path, self.folder / "done" / path.name)
        else:
            path.unlink()
        return None
