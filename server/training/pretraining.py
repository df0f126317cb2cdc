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
from skip2fleet.shared.datasets import Task, TaskOptions, load_task, samples
from skip2fleet.shared.datasets.federated import source_task
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.model import Model
from skip2fleet.shared.pretrain import PretrainConfig, pretrain
from skip2fleet.shared.spec import build, form_of, input_form


def pretrain_shown(task: Task, model: str, epochs: int, seed: int) -> Model:
    """Pretrain the built-in `model` on the task's source split, a bar per epoch with the loss."""
    spec = build(model, task.input_shape, len(task.classes))
    source = task.pretrain
    with progress(epochs, f"pretraining {model} on {task.name}") as advance:
        trained = pretrain(
            source.x,
            source.y,
            len(task.classes),
            PretrainConfig(epochs=epochs, seed=seed),
            on_epoch=lambda epoch, loss: advance(f"pretrained epoch {epoch + 1}, loss {loss:.3f}"),
            spec=spec,
        )
    return base_model.with_classes(trained, task.classes)


def fleet_source(fleet: FleetConfig, form: str | None = None) -> Task:
    """The coordinator's source data for the fleet's task, in `form` (default its model's)."""
    task, training = fleet.task, fleet.training
    data_dir = Path(task.data_dir) if task.data_dir else None
    form = form or input_form(training.model)
    if task.source is not None:
        return samples.source_task(Path(task.source), task.label_column, task.holdout, form)
    options = TaskOptions(data_dir, task.source_room, task.subjects, training.seed, form)
    return source_task(task.dataset, options)


def fleet_base(fleet: FleetConfig, base: Path | None = None) -> Model:
    """The base model for the fleet's task and model: the file `base` (from `fleet pretrain` or
    `fleet model import`: its own spec, whatever training.model says), checked to take the
    fleet's samples and name its classes, else pretrained now."""
    training = fleet.training
    if base is None:
        return pretrain_shown(
            fleet_source(fleet), training.model, training.pretrain_epochs, training.seed
        )
    model = base_model.load(base)
    if fleet.task.source is None and all(d.data.path for d in fleet.devices):
        return model  # own samples on every device, no source here: each checks them itself
    spec = base_model.spec_of(model)
    task = fleet_source(fleet, form_of(spec))
    if (spec.width, base_model.classes_of(model)) != (task.n_features, task.classes):
        raise FleetError(
            f"{base}: takes {spec.width} values per sample and knows the classes "
            f"{', '.join(base_model.classes_of(model))}; the fleet's data has "
            f"{task.n_features} and {', '.join(task.classes)}"
        )
    return model


def pretrain_command(
    out: Annotated[
        Path | None,
        typer.Option(
            callback=opt.writable_file,
            help="Where to write the base model (default runs/pretrain-<task>-<time>/base.npz).",
        ),
    ] = None,
    dataset: opt.Dataset = opt.DEFAULT_DATASET,
    model_name: opt.ModelName = opt.DEFAULT_MODEL,
    data_dir: opt.DataDir = None,
    epochs: opt.PretrainEpochs = PretrainConfig().epochs,
    seed: opt.Seed = 0,
    source_room: opt.SourceRoom = opt.DEFAULT_SOURCE_ROOM,
    subjects: opt.Subjects = opt.DEFAULT_SUBJECTS_OPTION,
    source: Annotated[
        Path | None,
        typer.Option(
            help="Your own samples (.npz/.csv files, a folder of them) instead of --dataset; "
            "a quarter of each class is held out."
        ),
    ] = None,
    label_column: opt.LabelColumn = samples.DEFAULT_LABEL_COLUMN,
) -> None:
    """Pretrain the base model on the task's source domain and save it with its sha256."""
    form = input_form(model_name)
    if source is not None:
        task = samples.source_task(source, label_column, samples.DEFAULT_HOLDOUT, form)
        dataset = "own"
    else:
        task = load_task(dataset, opt.task_options(data_dir, source_room, subjects, seed, form))
    model = pretrain_shown(task, model_name, epochs, seed)
    out = out or Path("runs") / time.strftime(f"pretrain-{dataset}-%Y%m%d-%H%M%S") / "base.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = base_model.save(model, out)
    on_source = base_model.accuracy(base_model.logits(model, task.pretrain.x), task.pretrain.y)
    target = base_model.accuracy(base_model.logits(model, task.test.x), task.test.y)
    typer.echo(f"wrote {out} (sha256 {digest})")
    held = "held-out part of --source" if source is not None else "target test split"
    typer.echo(f"accuracy on the source domain {on_source:.2f} %, on the {held} {target:.2f} %")
