"""Samples sent as JSON arrays of numbers, read fast: NumPy parses the numbers (a JSON parser costs
more than the prediction of a small model), and only the outline is checked by hand."""

from __future__ import annotations

import re

import numpy as np

from skip2fleet.shared.errors import DataError

_BETWEEN_ROWS = re.compile(rb"\]\s*,\s*\[")


def parse_samples(line: bytes, width: int) -> np.ndarray:
    """One sample `[v, ...]` or a batch `[[v, ...], ...]` as rows of float32 (samples x width);
    anything else, a wrong width, NaN or Inf: a `DataError` saying which."""
    text = line.strip()
    if not (text.startswith(b"[") and text.endswith(b"]")):
        raise DataError("not a JSON array of numbers")
    inner = text[1:-1].strip()
    batch = inner.startswith(b"[")
    if batch:
        if not inner.endswith(b"]"):
            raise DataError("not a JSON array of arrays of numbers")
        rows = _BETWEEN_ROWS.split(inner[1:-1])
    else:
        rows = [inner]
    body = b",".join(rows).decode("ascii", "replace")
    try:
        x = np.array(body.split(","), dtype=np.float32) if body.strip() else np.zeros(0, "f4")
    except ValueError:
        raise DataError("not a JSON array of numbers") from None
    if x.size != len(rows) * width or any(row.count(b",") != width - 1 for row in rows):
        sizes = sorted({row.count(b",") + 1 if row.strip() else 0 for row in rows} - {width})
        raise DataError(
            f"a sample has {sizes[0] if sizes else x.size} values; the model takes {width}"
        )
    if not np.isfinite(x).all():
        raise DataError("NaN or Inf")
    return x.reshape(len(rows), width)
