"""The cooling-fan vibration spectra of the paper's Fan tasks (matutani/cooling-fan).

A recording `<size>_<speed>_<type>_<room>[_<n>]` is one zip (or an unpacked folder of the same
name) of CSVs, one spectrum each: 512 lines `bin, amplitude`, 1 Hz per bin. Files are named by
timestamp, so their sorted order is time order. The first 256 bins are the features.

The paper does not publish its three classes. Our reading: {normal fan running, damaged fan running,
fan stopped}. An `hmlo` recording steps the fan through high, medium, low and off; the off step is
the stopped class. Its start is found per recording, from the data alone and without labels, as the
best two-segment least-squares split of the log spectral energy over the recording's second half:
on the 12 cm recordings it falls at sample 176-181 of 235 (the last 23-25 %), where the energy drops
to the room's floor. A split is the normal and the damaged recording of one room (2 x 235 = 470):
pretrain on recording `_1` of a silent room, fine-tune on `_1` near the ventilation fan (`noisy`),
test on `_2` there.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from skip2fleet.shared.datasets import Split, Task
from skip2fleet.shared.errors import DataError

CLASSES = ("normal", "damaged", "stopped")
BINS = 512
FEATURES = 256


def parse_spectrum(text: str, where: str) -> np.ndarray:
    """One CSV of `bin, amplitude` lines to its 512 amplitudes."""
    try:
        values = np.array(text.replace(",", " ").split(), dtype=np.float64)
    except ValueError:
        raise DataError(f"{where}: not numeric 'bin, amplitude' lines") from None
    if values.size % 2:
        raise DataError(f"{where}: a line lacks its amplitude")
    table = values.reshape(-1, 2)
    if len(table) != BINS:
        raise DataError(f"{where}: {len(table)} bins, expected {BINS}")
    if not np.array_equal(table[:, 0], np.arange(BINS)):
        raise DataError(f"{where}: bins are not 0..{BINS - 1} in order")
    bad = ~np.isfinite(table[:, 1])
    if bad.any():
        raise DataError(f"{where}: amplitude of bin {int(np.flatnonzero(bad)[0])} is NaN or Inf")
    return table[:, 1]


def read_recording(folder: Path, stem: str) -> np.ndarray:
    """All spectra of one recording in time order, from `<stem>/` or `<stem>.zip` in `folder`."""
    unpacked, packed = folder / stem, folder / f"{stem}.zip"
    if unpacked.is_dir():
        files = sorted(unpacked.glob("*.csv"))
        spectra = [parse_spectrum(f.read_text(), str(f)) for f in files]
    elif packed.is_file():
        try:
            with zipfile.ZipFile(packed) as archive:
                names = sorted(n for n in archive.namelist() if n.endswith(".csv"))
                spectra = [parse_spectrum(archive.read(n).decode(), f"{packed}:{n}") for n in names]
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise DataError(f"{packed}: not a readable zip, truncated or corrupt ({exc})") from None
    else:
        raise DataError(f"{folder}: recording {stem} is missing (neither {stem}.zip nor {stem}/)")
    if not spectra:
        raise DataError(f"{unpacked if unpacked.is_dir() else packed}: no CSV spectra inside")
    return np.array(spectra)


def stopped_from(spectra: np.ndarray) -> int:
    """Index of the first spectrum of the final 'fan off' step (see the module docstring)."""
    energy = np.log(spectra[:, :FEATURES].sum(axis=1) + 1e-12)
    n = len(energy)
    half = n // 2
    best, best_cost = n, np.inf
    for cut in range(half + 5, n - 4):
        a, b = energy[half:cut], energy[cut:]
        cost = a.var() * len(a) + b.var() * len(b)
        if cost < best_cost:
            best, best_cost = cut, cost
    return best


def labelled_recording(folder: Path, stem: str, running_class: int) -> Split:
    spectra = read_recording(folder, stem)
    labels = np.full(len(spectra), running_class, dtype=np.int64)
    labels[stopped_from(spectra) :] = CLASSES.index("stopped")
    return Split(spectra[:, :FEATURES].astype(np.float32), labels)


def room_split(folder: Path, damage: str, room: str, take: int) -> Split:
    """The normal and the `damage` hmlo recording `take` of the 12 cm fan in `room`."""
    parts = [
        labelled_recording(folder, f"12cm_hmlo_normal_{room}_{take}", CLASSES.index("normal")),
        labelled_recording(folder, f"12cm_hmlo_{damage}_{room}_{take}", CLASSES.index("damaged")),
    ]
    return Split(np.vstack([p.x for p in parts]), np.concatenate([p.y for p in parts]))


def load_fan_task(damage: str, folder: Path, source_room: str) -> Task:
    return Task(
        name=f"fan-{damage}",
        classes=CLASSES,
        pretrain=room_split(folder, damage, source_room, 1),
        finetune=room_split(folder, damage, "noisy", 1),
        test=room_split(folder, damage, "noisy", 2),
    )
