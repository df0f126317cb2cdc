"""Turn the cooling-fan recordings into skip2fleet's own-data format, as a user would.

A shelf of five fan monitors near a ventilation fan (the `noisy` room): each device gets every
fifth spectrum of the noisy recordings of take 1 (a normal fan, an unbalanced one, one with a
chipped blade) as CSV files, one per recording, with a `label` column; the coordinator gets the
same fans recorded in a quiet room (`silentA`, both takes) as one `.npz` to pretrain on; and
`new/` holds take 2 of the noisy room, the samples a device will classify after fine-tuning.
Labels are class names: `normal`, `damaged`, and `stopped` for the last speed step (fan off) of
each `hmlo` recording, found with skip2fleet's documented rule (docs/data.md).

    python examples/fan_to_samples.py $FLEET_DATA_DIR/cooling-fan [fan-samples]

writes fan-samples/{source,devices/pi-1..pi-5,new} and fan-samples/fleet.yaml (the default output
folder, which git ignores). Every recording is read before anything is written, and the folder
appears whole: an unreadable recording is one line naming it, exit code 2, and no folder.
"""

from __future__ import annotations

import csv
import shutil
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import yaml

from skip2fleet.shared.datasets.fan import stopped_from

DEVICES = 5
FEATURES = 256  # bins 0..255 Hz of the 512 in each spectrum
FANS = {"normal": "normal", "damage1": "damaged", "damage2": "damaged"}


def spectra(folder: Path, stem: str) -> np.ndarray:
    """Every spectrum of one recording, in time order (its CSVs are named by timestamp); a
    recording that cannot be read is an error naming it."""
    path = folder / f"{stem}.zip"
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted(n for n in archive.namelist() if n.endswith(".csv"))
            rows = [np.loadtxt(archive.open(n), delimiter=",")[:, 1] for n in names]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(
            f"{path}: unreadable ({exc.strerror or exc if isinstance(exc, OSError) else exc})"
        ) from None
    return np.array(rows)[:, :FEATURES]


def labelled(folder: Path, fan: str, room: str, take: int) -> tuple[np.ndarray, np.ndarray]:
    x = spectra(folder, f"12cm_hmlo_{fan}_{room}_{take}")
    labels = np.full(len(x), FANS[fan], dtype="<U8")
    labels[stopped_from(x) :] = "stopped"
    return x.astype(np.float32), labels


def read(recordings: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every spectrum the samples are made of, by what it becomes."""
    parts = {f"source/{f}-{t}": labelled(recordings, f, "silentA", t) for f in FANS for t in (1, 2)}
    parts |= {f"devices/{f}": labelled(recordings, f, "noisy", 1) for f in FANS}
    return parts | {f"new/{f}": labelled(recordings, f, "noisy", 2) for f in FANS}


def write(parts: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> None:
    """The source, the devices' CSV files, the new samples and the fleet file, into `out`."""
    source = [parts[f"source/{f}-{t}"] for f in FANS for t in (1, 2)]
    (out / "source").mkdir(parents=True)
    x, y = (np.concatenate(a) for a in zip(*source, strict=True))
    np.savez(out / "source" / "silentA.npz", x=x, y=y)
    for fan in FANS:
        x, labels = parts[f"devices/{fan}"]
        for d in range(DEVICES):
            folder = out / "devices" / f"pi-{d + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{fan}.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow([f"hz{i}" for i in range(FEATURES)] + ["label"])
                for row, label in zip(x[d::DEVICES], labels[d::DEVICES], strict=True):
                    writer.writerow([f"{v:.6g}" for v in row] + [label])
    (out / "new").mkdir()
    x, y = (np.concatenate(a) for a in zip(*(parts[f"new/{f}"] for f in FANS), strict=True))
    np.savez(out / "new" / "noisy-take2.npz", x=x, y=y)


def fleet_file(root: Path) -> dict:
    """The fleet of five devices, each on its own folder, pretraining on the source; deployed,
    it fine-tunes every morning when every fan has new samples, and a damaged fan is an alarm."""
    return {
        "task": {"source": str(root / "source"), "alert_classes": ["damaged"]},
        "training": {"epochs": 100},
        "federation": {"rounds": 3, "min_devices": DEVICES, "schedule": "*-*-* 06:00"},
        "devices": [
            {"name": f"pi-{d + 1}", "data": {"path": str(root / "devices" / f"pi-{d + 1}")}}
            for d in range(DEVICES)
        ],
    }


def main(recordings: Path, out: Path) -> None:
    """Read every recording, then write the folder aside and rename it into place."""
    if out.exists():
        raise ValueError(f"{out}: exists already; remove it or name another folder")
    parts = read(recordings)
    staging = Path(tempfile.mkdtemp(dir=out.resolve().parent, prefix=f".{out.name}-"))
    try:
        write(parts, staging)
        fleet = fleet_file(out.resolve())
        (staging / "fleet.yaml").write_text(yaml.safe_dump(fleet, sort_keys=False))
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out}/source, {out}/devices/pi-1..pi-{DEVICES}, {out}/new and {out}/fleet.yaml")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) == 3 else "fan-samples"))
    except (OSError, ValueError) as exc:  # a recording, the output folder, a full disk
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
