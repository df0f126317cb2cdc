"""Command-line options that several `fleet` commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.datasets import TASKS, TaskOptions, parse_subjects
from shared.errors import FleetError
from shared.train import FineTuneConfig

_defaults = FineTuneConfig()

Dataset = Annotated[
    str,
    typer.Option(help=f"Task: {', '.join(TASKS)}. 'generated' needs no data folder."),
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        help="Folder holding cooling-fan/ and hapt/ (or one of them, or a UCI HAR download). "
        "Default: $FLEET_DATA_DIR.",
        file_okay=False,
    ),
]
SourceRoom = Annotated[
    str, typer.Option(help="Fan tasks: the silent room to pretrain in, silentA or silentB.")
]
Subjects = Annotated[
    str, typer.Option(help="HAR: the target group of subjects, fine-tuned and tested on.")
]
Seed = Annotated[int, typer.Option(help="Seed of pretraining, adapter init and shuffling.")]
Epochs = Annotated[int, typer.Option(min=1, help="Fine-tuning epochs.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Fine-tuning mini-batch size.")]
Rank = Annotated[int, typer.Option(min=1, help="LoRA rank r of every adapter.")]
LearningRate = Annotated[float, typer.Option("--lr", min=0.0, help="SGD learning rate.")]
PretrainEpochs = Annotated[int, typer.Option(min=1, help="Epochs of pretraining the base.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON.")]

FleetFile = Annotated[
    Path | None, typer.Option("--config", help="The fleet file (default ./fleet.yaml).")
]
DeviceCount = Annotated[
    int | None, typer.Option(min=1, help="Simulate this many devices instead of fleet.yaml's.")
]
DatasetOverride = Annotated[str | None, typer.Option(help="Override the fleet's data set.")]

DEFAULT_DATASET = "generated"
DEFAULT_SUBJECTS = "9,14,16,19,25"
DEFAULT_EPOCHS = _defaults.epochs
DEFAULT_BATCH = _defaults.batch_size
DEFAULT_RANK = _defaults.rank
DEFAULT_LR = _defaults.lr


def task_options(data_dir: Path | None, source_room: str, subjects: str, seed: int) -> TaskOptions:
    return TaskOptions(data_dir, source_room, parse_subjects(subjects), seed)


def fresh_workdir(workdir: Path) -> Path:
    """A bench's --workdir: new or empty, so that no earlier run is mixed into its results."""
    if workdir.exists() and any(workdir.iterdir()):
        raise FleetError(f"{workdir}: not empty; choose another --workdir")
    return workdir
