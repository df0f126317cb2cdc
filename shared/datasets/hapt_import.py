"""`hapt_raw.npz` from the UCI HAPT download, the file the HAR loader reads.

UCI's "Smartphone-Based Recognition of Human Activities and Postural Transitions" ships its raw
signals as `RawData/acc_expEE_userUU.txt` and `gyro_expEE_userUU.txt` (three columns each, 50 Hz)
and `RawData/labels.txt` (experiment, user, activity, first and last sample of a labelled stretch,
inclusive). The archive holds them as one table in experiment order: `signals` (acc xyz in g, gyro
xyz in rad/s), `labels` (-1 where no stretch is labelled), `subject`, and `experiment` (0-based).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from skip2fleet.shared.atomic import write_atomic
from skip2fleet.shared.errors import DataError

SIGNAL = re.compile(r"acc_exp(\d+)_user(\d+)\.txt")


def import_hapt(raw_dir: Path, out: Path) -> dict[str, int]:
    """Write `out` from a HAPT `RawData` folder; returns what it holds (rows, experiments, ...)."""
    raw_dir = Path(raw_dir)
    recordings = sorted(
        (int(m[1]), int(m[2]))
        for p in raw_dir.glob("acc_exp*_user*.txt")
        if (m := SIGNAL.match(p.name))
    )
    if not recordings:
        raise DataError(f"{raw_dir}: no acc_expEE_userUU.txt files (the HAPT RawData folder?)")
    stretches = _table(raw_dir / "labels.txt", columns=5).astype(np.int64)
    parts: dict[str, list[np.ndarray]] = {
        "signals": [],
        "labels": [],
        "subject": [],
        "experiment": [],
    }
    for experiment, user in recordings:
        stem = f"exp{experiment:02d}_user{user:02d}.txt"
        acc, gyro = (_table(raw_dir / f"{kind}_{stem}", columns=3) for kind in ("acc", "gyro"))
        if len(acc) != len(gyro):
            raise DataError(f"{raw_dir / ('gyro_' + stem)}: {len(gyro)} rows, acc has {len(acc)}")
        labels = np.full(len(acc), -1, np.int8)
        for _, _, activity, first, last in stretches[stretches[:, 0] == experiment]:
            if not 0 <= first <= last < len(acc):
                raise DataError(
                    f"{raw_dir / 'labels.txt'}: experiment {experiment}: "
                    f"samples {first}-{last} outside its {len(acc)} rows"
                )
            labels[first : last + 1] = activity
        parts["signals"].append(np.hstack([acc, gyro]).astype(np.float32))
        parts["labels"].append(labels)
        parts["subject"].append(np.full(len(acc), user, np.int8))
        parts["experiment"].append(np.full(len(acc), experiment - 1, np.int16))
    arrays = {name: np.concatenate(values) for name, values in parts.items()}
    write_atomic(Path(out), lambda handle: np.savez_compressed(handle, **arrays))
    return {
        "rows": len(arrays["labels"]),
        "experiments": len(recordings),
        "subjects": len({user for _, user in recordings}),
        "labelled_rows": int((arrays["labels"] > 0).sum()),
    }


def _table(path: Path, columns: int) -> np.ndarray:
    try:
        table = np.loadtxt(path, ndmin=2)
    except OSError:
        raise DataError(f"{path}: missing") from None
    except ValueError as exc:
        raise DataError(f"{path}: not a table of numbers ({exc})") from None
    if table.shape[1] != columns:
        raise DataError(f"{path}: {table.shape[1]} columns, expected {columns}")
    if not np.isfinite(table).all():
        raise DataError(f"{path}: holds NaN or Inf")
    return table
