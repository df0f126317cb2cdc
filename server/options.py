"""Command-line options that several `fleet` commands share, declared once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from skip2fleet.server.progress import stderr
from skip2fleet.shared import datasets
from skip2fleet.shared.config import (
    MAX_LR,
    TRAINING_LIMITS,
    Device,
    DeviceData,
    FleetConfig,
    as_yaml_dict,
    load_config,
    parse_config,
)
from skip2fleet.shared.datasets import TASKS, TaskOptions, parse_subjects
from skip2fleet.shared.datasets.federated import default_partitions
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.spec import MODELS
from skip2fleet.shared.train import FineTuneConfig

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


def _bounded(name: str, help_text: str, flag: str | None = None) -> typer.models.OptionInfo:
    """An integer option with fleet.yaml's bounds for `training.<name>`."""
    low, high = TRAINING_LIMITS[name]
    return typer.Option(*([flag] if flag else []), min=low, max=high, help=help_text)


def _check_lr(value: float) -> float:
    if not 0 < value <= MAX_LR:
        raise typer.BadParameter(f"{value} is not above 0 and at most {MAX_LR}")
    return value


Subjects = Annotated[
    str, typer.Option(help="HAR: the target group of subjects, fine-tuned and tested on.")
]
Seed = Annotated[int, typer.Option(help="Seed of pretraining, adapter init and shuffling.")]
Epochs = Annotated[int, _bounded("epochs", "Fine-tuning epochs.")]
BatchSize = Annotated[int, _bounded("batch_size", "Fine-tuning mini-batch size.")]
Rank = Annotated[int, _bounded("rank", "LoRA rank r of every adapter.")]
LearningRate = Annotated[
    float, typer.Option("--lr", callback=_check_lr, help=f"SGD learning rate, in (0, {MAX_LR}].")
]
PretrainEpochs = Annotated[int, _bounded("pretrain_epochs", "Epochs of pretraining the base.")]
LabelColumn = Annotated[str, typer.Option(help="The label column of CSV files.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON.")]

ConfigPath = Annotated[Path, typer.Option("--config", help="The fleet file.")]
FleetFile = Annotated[
    Path | None, typer.Option("--config", help="The fleet file (default ./fleet.yaml).")
]
DeviceCount = Annotated[
    int | None, typer.Option(min=1, help="Simulate this many devices instead of fleet.yaml's.")
]
DatasetOverride = Annotated[str | None, typer.Option(help="Override the fleet's data set.")]
ModelName = Annotated[
    str,
    typer.Option("--model", help=f"Built-in model: {', '.join(MODELS)} (the README's specs)."),
]
ModelOverride = Annotated[
    str | None, typer.Option("--model", help=f"Override the fleet's model: {', '.join(MODELS)}.")
]

DEFAULT_DATASET = "generated"
DEFAULT_MODEL = "mlp"
DEFAULT_SOURCE_ROOM = datasets.DEFAULT_SOURCE_ROOM
DEFAULT_SUBJECTS_OPTION = ",".join(map(str, datasets.DEFAULT_SUBJECTS))
DEFAULT_EPOCHS = _defaults.epochs
DEFAULT_BATCH = _defaults.batch_size
DEFAULT_RANK = _defaults.rank
DEFAULT_LR = _defaults.lr


def task_options(
    data_dir: Path | None, source_room: str, subjects: str, seed: int, form: str = "features"
) -> TaskOptions:
    """The task's options, its data in `form` (`shared.spec.input_form` of the model)."""
    return TaskOptions(data_dir, source_room, parse_subjects(subjects), seed, form)


def with_model(config: FleetConfig, model: str | None) -> FleetConfig:
    """The fleet with `training.model` overridden (by --model), validated again."""
    if model is None:
        return config
    data = as_yaml_dict(config)
    data["training"]["model"] = model
    return parse_config(data, config.source)


def fresh_workdir(workdir: Path) -> Path:
    """A bench's --workdir: new or empty, so that no earlier run is mixed into its results."""
    if workdir.exists() and any(workdir.iterdir()):
        raise FleetError(f"{workdir}: not empty; choose another --workdir")
    return workdir


DEFAULT_CONFIG = Path("fleet.yaml")


def resolve_fleet(
    config_path: Path | None,
    devices: int | None,
    rounds: int | None,
    dataset: str | None,
    data_dir: Path | None,
    aggregation: str | None,
    model: str | None = None,
) -> FleetConfig:
    """fleet.yaml with the command line's overrides, validated again.

    Without --config, ./fleet.yaml if there is one (a folder or an empty file there is an error),
    else the built-in example fleet, said on stderr."""
    path = config_path or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if path is None:
        stderr.print(
            "no ./fleet.yaml: running the built-in example fleet (generated data, "
            "3 devices unless --devices); pass --config FILE for your own"
        )
    config = load_config(path) if path else parse_config({}, "built-in example fleet")
    data = as_yaml_dict(config)
    if rounds is not None:
        data["federation"]["rounds"] = rounds
    if aggregation is not None:
        data["federation"]["aggregation"] = aggregation
    if data_dir is not None:
        data["task"]["data_dir"] = str(data_dir)
    if dataset is not None:
        data["task"]["dataset"] = dataset
    if devices is not None or dataset is not None or not config.devices:
        count = devices or max(len(config.devices), 3)
        partitions = default_partitions(data["task"]["dataset"], count, config.task.subjects)
        data["devices"] = [
            dataclasses.asdict(Device(f"sim-{i + 1}", data=DeviceData(partition)))
            for i, partition in enumerate(partitions)
        ]
        data["federation"]["min_devices"] = min(data["federation"]["min_devices"], count)
    return with_model(parse_config(data, str(path or "built-in example fleet")), model)
