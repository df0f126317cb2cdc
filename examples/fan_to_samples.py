"""Turn the cooling-fan recordings into skip2fleet's own-data format, as a user would.

A shelf of five fan monitors near a ventilation fan (the `noisy` room): each device gets every
fifth spectrum of the noisy recordings of take 1 (a normal fan, an unbalanced one, one with a
chipped blade) as CSV files, one per recording, with a `label` column; the coordinator gets the
same fans recorded in a quiet room (`silentA`, both takes) as one `.npz` to pretrain on; and
`new/` holds take 2 of the noisy room, the samples a device will classify after fine-tuning.
Labels are class names: `normal`, `damaged`, and `stopped` for the last speed step (fan off) of
each `hmlo` recording, found with skip2fleet's documented rule (README, "The data").

    python examples/fan_to_samples.py $FLEET_DATA_DIR/cooling-fan fan-samples

writes fan-samples/{source,devices/pi-1..pi-5,new} and fan-samples/fleet.yaml.
"""

from __future__ import annotations

import csv
import sys
import zipfile
from pathlib import Path

import numpy as np
import yaml

from skip2fleet.shared.datasets.fan import stopped_from

DEVICES = 5
FEATURES = 256  # bins 0..255 Hz of the 512 in each spectrum
FANS = {"normal": "normal", "damage1": "damaged", "damage2": "damaged"}


def spectra(folder: Path, stem: str) -> np.ndarray:
    """Every spectrum of one recording, in time order (its CSVs are named by timestamp)."""
    with zipfile.ZipFile(folder / f"{stem}.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".csv"))
        rows = [np.loadtxt(archive.open(n), delimiter=",")[:, 1] for n in names]
    return np.array(rows)[:, :FEATURES]


def labelled(folder: Path, fan: str, room: str, take: int) -> tuple[np.ndarray, np.ndarray]:
    x = spectra(folder, f"12cm_hmlo_{fan}_{room}_{take}")
    labels = np.full(len(x), FANS[fan], dtype="<U8")
    labels[stopped_from(x) :] = "stopped"
    return x.astype(np.float32), labels


def main(recordings: Path, out: Path) -> None:
    xs, ys = zip(
        *(labelled(recordings, f, "silentA", t) for f in FANS for t in (1, 2)), strict=True
    )
    (out / "source").mkdir(parents=True, exist_ok=True)
    np.savez(out / "source" / "silentA.npz", x=np.vstack(xs), y=np.concatenate(ys))
    for fan in FANS:
        x, labels = labelled(recordings, fan, "noisy", 1)
        for d in range(DEVICES):
            folder = out / "devices" / f"pi-{d + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{fan}.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow([f"hz{i}" for i in range(FEATURES)] + ["label"])
                for row, label in zip(x[d::DEVICES], labels[d::DEVICES], strict=True):
                    writer.writerow([f"{v:.6g}" for v in row] + [label])
    xs, ys = zip(*(labelled(recordings, f, "noisy", 2) for f in FANS), strict=True)
    (out / "new").mkdir(exist_ok=True)
    np.savez(out / "new" / "noisy-take2.npz", x=np.vstack(xs), y=np.concatenate(ys))
    root = out.resolve()
    fleet = {
        "task": {"source": str(root / "source")},
        "training": {"epochs": 100},
        "federation": {"rounds": 3, "min_devices": DEVICES},
        "devices": [
            {"name": f"pi-{d + 1}", "data": {"path": str(root / "devices" / f"pi-{d + 1}")}}
            for d in range(DEVICES)
        ],
    }
    (out / "fleet.yaml").write_text(yaml.safe_dump(fleet, sort_keys=False))
    print(f"wrote {out}/source, {out}/devices/pi-1..pi-{DEVICES}, {out}/new and {out}/fleet.yaml")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
