"""Fine-tuned adapters as a file: the arrays a device trained, tied to the base they fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.atomic import write_atomic


def save_adapters(
    path: Path, arrays: dict[str, np.ndarray], method: str, rank: int, base_sha256: str
) -> Path:
    """Write the trained arrays with the method, rank and base hash they belong to."""
    meta = {"meta.method": method, "meta.rank": rank, "meta.base_sha256": base_sha256}
    content = {**arrays, **{key: np.array(value) for key, value in meta.items()}}
    return write_atomic(path, lambda handle: np.savez(handle, **content))
