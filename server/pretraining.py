"""The coordinator pretrains the base model: on a task's or a fleet's source data, with progress."""

from __future__ import annotations

from pathlib import Path

from server.progress import progress
from shared.config import FleetConfig
from shared.datasets import Split, TaskOptions
from shared.datasets.federated import source_split
from shared.model import Model
from shared.pretrain import PretrainConfig, pretrain


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
