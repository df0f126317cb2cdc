"""Tasks: a source domain to pretrain on, and a drifted target domain to fine-tune and test on.

Every task comes as three labelled splits of raw sample rows, in one of three forms: `features`
(what the MLP reads: HAR's window features, a fan spectrum as 256 features), `windows` (what a
1-D CNN reads: HAR's raw 9 x 128 windows, a fan spectrum as one channel of 256) or `images` (what
a 2-D CNN reads: HAR's windows as 9 x 17 x 13 log-spectrograms, a digit as 1 x 8 x 8), always the
same samples, subjects and splits, so results of the kinds of model compare. The registry maps a
task name to its loader; `load_task` resolves the data folder and turns any problem into a
`DataError` that names the file and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skip2fleet.shared.errors import DataError, FleetError

DEFAULT_SUBJECTS = (9, 14, 16, 19, 25)
SOURCE_ROOMS = ("silentA", "silentB")
FORMS = ("features", "windows", "images")
DEFAULT_SOURCE_ROOM = SOURCE_ROOMS[0]
ONE_CHANNEL = ("fan-damage1", "fan-damage2", "generated")  # spectra: as windows, one channel
FORM_TASKS = {
    "features": ("har", "fan-damage1", "fan-damage2", "digits", "generated"),
    "windows": ("har", *ONE_CHANNEL),
    "images": ("har", "digits"),
}


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32, one row of raw features per sample
    y: np.ndarray  # int64 class indices

    def __len__(self) -> int:
        return len(self.y)

    def check(self, what: str) -> Split:
        if self.x.ndim != 2 or len(self.x) != len(self.y):
            raise DataError(f"{what}: features and labels disagree in length")
        if not np.all(np.isfinite(self.x)):
            row = int(np.flatnonzero(~np.isfinite(self.x).all(axis=1))[0])
            raise DataError(f"{what}: sample {row} holds NaN or Inf")
        return self


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    pretrain: Split  # source domain
    finetune: Split  # target domain, what a device trains on
    test: Split  # target domain, held out
    shape: tuple[int, ...] = ()  # of a sample: (channels, length) or (channels, height, width)

    @property
    def n_features(self) -> int:
        return self.pretrain.x.shape[1]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(features,), (channels, length) or (channels, height, width): what a spec takes."""
        return self.shape or (self.n_features,)


@dataclass(frozen=True)
class TaskOptions:
    data_dir: Path | None = None
    source_room: str = DEFAULT_SOURCE_ROOM
    subjects: tuple[int, ...] = DEFAULT_SUBJECTS
    seed: int = 0
    form: str = "features"  # one of FORMS


def _fan(name: str) -> Callable[[TaskOptions], Task]:
    def load(options: TaskOptions) -> Task:
        from skip2fleet.shared.datasets.fan import load_fan_task

        return load_fan_task(name, dataset_dir(options, "cooling-fan"), options.source_room)

    return load


def _har(options: TaskOptions) -> Task:
    from skip2fleet.shared.datasets.har import load_har_task

    return load_har_task(dataset_dir(options, "hapt"), options.subjects, options.form)


def _digits(options: TaskOptions) -> Task:
    from skip2fleet.shared.datasets.digits import load_digits_task

    return load_digits_task(options.form)


def _generated(options: TaskOptions) -> Task:
    from skip2fleet.shared.datasets.generated import generated_task

    return generated_task(options.seed)


TASKS: dict[str, Callable[[TaskOptions], Task]] = {
    "fan-damage1": _fan("damage1"),
    "fan-damage2": _fan("damage2"),
    "har": _har,
    "digits": _digits,
    "generated": _generated,
}


def load_task(name: str, options: TaskOptions = TaskOptions()) -> Task:
    """The task `name` with its three splits checked (shapes agree, no NaN or Inf)."""
    if name not in TASKS:
        raise FleetError(f"unknown dataset {name!r}; choose from {', '.join(TASKS)}")
    if options.source_room not in SOURCE_ROOMS:
        raise FleetError(
            f"unknown source room {options.source_room!r}; choose from {', '.join(SOURCE_ROOMS)}"
        )
    if options.form not in FORMS:
        raise FleetError(f"unknown data form {options.form!r}; choose from {', '.join(FORMS)}")
    form = options.form
    if name not in FORM_TASKS[form]:
        raise FleetError(f"{name} has no {form} form; {form}: {', '.join(FORM_TASKS[form])}")
    task = TASKS[name](options)
    if options.form == "windows" and name in ONE_CHANNEL:  # a spectrum is a one-channel window
        task = dataclasses.replace(task, shape=(1, task.n_features))
    for split in ("pretrain", "finetune", "test"):
        getattr(task, split).check(f"{name} {split} split")
    return task


def dataset_dir(options: TaskOptions, folder: str) -> Path:
    """`--data-dir` (or $FLEET_DATA_DIR) itself, or its sub-folder named after the data set."""
    root = options.data_dir or os.environ.get("FLEET_DATA_DIR")
    if not root:
        raise FleetError(
            f"no data folder for the {folder} data: pass --data-dir or set FLEET_DATA_DIR"
        )
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder does not exist")
    return root / folder if (root / folder).is_dir() else root


def parse_subjects(text: str) -> tuple[int, ...]:
    """'9,14,16' -> (9, 14, 16); subjects are the 30 UCI HAR volunteers."""
    try:
        subjects = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise FleetError(f"--subjects {text!r}: expected comma-separated numbers") from None
    if not subjects or not all(1 <= s <= 30 for s in subjects):
        raise FleetError(f"--subjects {text!r}: subjects are numbered 1 to 30")
    return subjects
