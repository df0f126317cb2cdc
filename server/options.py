"""Command-line options that several `fleet` commands share, declared once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import click
import typer

from skip2fleet.server.progress import stderr
from skip2fleet.shared import datasets
from skip2fleet.shared.atomic import check_writable
from skip2fleet.shared.cache import CODECS
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


def check_optional_lr(value: float | None) -> float | None:
    """`--lr` where leaving it out means a per-model default."""
    return None if value is None else _check_lr(value)


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


def writable_file(path: Path | None) -> Path | None:
    """An output file's option: refused now, in one line, if it cannot be written later."""
    return None if path is None else check_writable(path)


def writable_folder(path: Path | None) -> Path | None:
    """An output folder's option, the same."""
    return None if path is None else check_writable(path, folder=True)


def new_run_folder(path: Path | None) -> Path | None:
    """A new run folder's option: writable and not a run already (before the base is trained)."""
    if path is not None and (writable_folder(path) / "fleet.yaml").exists():
        raise FleetError(f"{path}: a run folder already exists here; use --resume")
    return path


def fresh_workdir(workdir: Path) -> Path:
    """A bench's --workdir: writable, new or empty, so that no earlier run is mixed into its
    results."""
    if writable_folder(workdir).exists() and any(workdir.iterdir()):
        raise FleetError(f"{workdir}: not empty; choose another --workdir")
    return workdir


JsonOut = Annotated[
    Path | None,
    typer.Option("--json", callback=writable_file, help="Also write the results as JSON."),
]

ConfigPath = Annotated[Path, typer.Option("--config", help="The fleet file.")]
RunOut = Annotated[
    Path | None,
    typer.Option(
        "--out", callback=new_run_folder, help="A new run folder (default runs/<command>-<time>)."
    ),
]
Resume = Annotated[
    Path | None,
    typer.Option("--resume", help="Continue this run folder after its last completed round."),
]
BaseFile = Annotated[
    Path | None,
    typer.Option(
        "--base",
        help="Base model (.npz, from `fleet pretrain`), checked against the fleet's samples and "
        "classes; default: pretrain one now.",
    ),
]
FleetFile = Annotated[
    Path | None, typer.Option("--config", help="The fleet file (default ./fleet.yaml).")
]
MAX_SIMULATED_DEVICES = 1000  # each is a Flower node in this process; a million took > 1 GB
DeviceCount = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=MAX_SIMULATED_DEVICES,
        help=f"Simulate this many devices instead of fleet.yaml's (at most "
        f"{MAX_SIMULATED_DEVICES}).",
    ),
]
DatasetOverride = Annotated[str | None, typer.Option(help="Override the fleet's data set.")]
ModelName = Annotated[
    str,
    typer.Option("--model", help=f"Built-in model: {', '.join(MODELS)} (docs/models.md)."),
]
ModelOverride = Annotated[
    str | None, typer.Option("--model", help=f"Override the fleet's model: {', '.join(MODELS)}.")
]

CacheCodec = Annotated[
    str,
    typer.Option(
        "--cache",
        click_type=click.Choice(CODECS),
        help=f"Skip2-LoRA's cache codec: {', '.join(CODECS)} (int: a scale and offset per group).",
    ),
]
CacheOverride = Annotated[
    str | None,
    typer.Option(
        "--cache", click_type=click.Choice(CODECS), help="Override the fleet's cache codec."
    ),
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


def with_training(config: FleetConfig, **overrides: str | None) -> FleetConfig:
    """The fleet with `training` fields overridden by the command line (None keeps fleet.yaml's),
    validated again."""
    chosen = {name: value for name, value in overrides.items() if value is not None}
    if not chosen:
        return config
    data = as_yaml_dict(config)
    data["training"].update(chosen)
    return parse_config(data, config.source)


DEFAULT_CONFIG = Path("fleet.yaml")


def resolve_fleet(
    config_path: Path | None,
    devices: int | None,
    rounds: int | None,
    dataset: str | None,
    data_dir: Path | None,
    aggregation: str | None,
    model: str | None = None,
    cache: str | None = None,
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
    fleet = parse_config(data, str(path or "built-in example fleet"))
    return with_training(fleet, model=model, cache=cache)


def chosen(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    """The comma-separated names of `value`, each one of `allowed`; else one line naming them."""
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        raise FleetError(
            f"{option}: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(allowed)}"
        )
    return chosen


def counts(value: str, option: str) -> list[int]:
    """Comma-separated positive counts (`10,100,1000`); else one line naming the option."""
    try:
        numbers = [int(n) for n in value.split(",")]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise FleetError(f"{option}: {value!r} is not a list of counts like 10,100")
    return numbers
