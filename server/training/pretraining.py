"""The coordinator pretrains the base model: on a task's or a fleet's source data, with progress.

`fleet pretrain` does it for one task and saves the base with its sha256."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from skip2fleet.server import options as opt
from skip2fleet.server.progress import progress
from skip2fleet.shared import model as base_model
from skip2fleet.shared.config import FleetConfig
from skip2fleet.shared.datasets import Split, TaskOptions, load_task
from skip2fleet.shared.datasets.federated import source_split
from skip2fleet.shared.model import Model
from skip2fleet.shared.pretrain import PretrainConfig, pretrain


def pretrain_shown(source: Split, n_classes: int, name: str, epochs: int, seed: int) -> Model:
    """Pretrain on `source`, showing a bar per epoch with the loss."""
    with progress(epochs, f"pretraining on {name}") as advance:
        return pretrain(
            source.x,
            source.y,
            n_classes,
            PretrainConfig(epochs=epochs, seed=seed),
            on_epoch=lambda epoch, loss: advance(f"pretrained epoch {epoch + 1}, loss {loss:.3f}"),
        )


def fleet_base(fleet: FleetConfig) -> Model:
    """The base model for the fleet's task, from the coordinator's source data."""
    task = fleet.task
    data_dir = Path(task.data_dir) if task.data_dir else None
    options = TaskOptions(data_dir, task.source_room, task.subjects, fleet.training.seed)
    source, classes = source_split(task.dataset, options)
    return pretrain_shown(
        source, len(classes), task.dataset, fleet.training.pretrain_epochs, fleet.training.seed
    )


def pretrain_command(
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the base model (default runs/pretrain-<task>-<time>/base.npz)."
        ),
    ] = None,
    dataset: opt.Dataset = opt.DEFAULT_DATASET,
    data_dir: opt.DataDir = None,
    epochs: opt.PretrainEpochs = PretrainConfig().epochs,
    seed: opt.Seed = 0,
    source_room: opt.SourceRoom = opt.DEFAULT_SOURCE_ROOM,
    subjects: opt.Subjects = opt.DEFAULT_SUBJECTS_OPTION,
) -> None:
    """Pretrain the base model on the task's source domain and save it with its sha256."""
    task = load_task(dataset, opt.task_options(data_dir, source_room, subjects, seed))
    model = pretrain_shown(task.pretrain, len(task.classes), task.name, epochs, seed)
    out = out or Path("runs") / time.strftime(f"pretrain-{dataset}-%Y%m%d-%H%M%S") / "base.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = base_model.save(model, out)
    source = base_model.accuracy(base_model.logits(model, task.pretrain.x), task.pretrain.y)
    target = base_model.accuracy(base_model.logits(model, task.test.x), task.test.y)
    typer.echo(f"wrote {out} (sha256 {digest})")
    typer.echo(
        f"accuracy on the source domain {source:.2f} %, on the target test split {target:.2f} %"
    )
