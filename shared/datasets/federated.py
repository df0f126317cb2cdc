"""The data of a federation: what the coordinator pretrains on, and each device's own data.

A device is a partition of the task's target domain:
- `generated`: partition k is a noisy room of its own (its own interference, floor k-dependent);
- `har`: partition s is subject s (its 60/40 split, as in the central task); the base is
  pretrained on every subject outside `task.subjects`;
- `fan-damage1`, `fan-damage2`: partition `damage1` or `damage2`, that damage type near the
  ventilation fan; the base is pretrained on the silent room with both damage types;
- `digits`: every device holds the (synthetically shifted) target split.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from skip2fleet.shared.datasets import Split, Task, TaskOptions, dataset_dir, load_task
from skip2fleet.shared.datasets.generated import noisy_room, spectra
from skip2fleet.shared.datasets.har import load_har_subject
from skip2fleet.shared.errors import FleetError

FAN_PARTITIONS = ("damage1", "damage2")


def source_task(dataset: str, options: TaskOptions) -> Task:
    """The coordinator's task: its pretraining split is what the base is trained on."""
    if dataset.startswith("fan-"):
        tasks = [load_task(f"fan-{p}", options) for p in FAN_PARTITIONS]
        x = np.vstack([t.pretrain.x for t in tasks])
        y = np.concatenate([t.pretrain.y for t in tasks])
        return dataclasses.replace(tasks[0], name=dataset, pretrain=Split(x, y))
    return load_task(dataset, options)


def device_split(dataset: str, partition: str, options: TaskOptions) -> tuple[Split, Split]:
    """A device's (fine-tune, test) data."""
    if dataset == "generated":
        index = _integer(partition, dataset)
        rng = np.random.default_rng([options.seed, 7, index])
        room = noisy_room(rng, strength=0.8 + 0.1 * (index % 5))
        noise = 0.1 + 0.02 * (index % 5)
        return spectra(rng, 300, noise, room), spectra(rng, 300, noise, room)
    if dataset == "har":
        task = load_har_subject(
            dataset_dir(options, "hapt"), _integer(partition, dataset), options.form
        )
        return task.finetune, task.test
    if dataset.startswith("fan-"):
        if partition not in FAN_PARTITIONS:
            raise FleetError(
                f"fan partition {partition!r}: choose one of {', '.join(FAN_PARTITIONS)}"
            )
        task = load_task(f"fan-{partition}", options)
        return task.finetune, task.test
    if dataset == "digits":  # every device draws with the same synthetic pen
        task = load_task(dataset, options)
        return task.finetune, task.test
    raise FleetError(f"unknown dataset {dataset!r}")


def default_partitions(dataset: str, devices: int, subjects: tuple[int, ...]) -> list[str]:
    """Partitions for `devices` simulated devices when fleet.yaml does not list them."""
    if dataset == "har":
        if devices > len(subjects):
            raise FleetError(f"har: {devices} devices but only {len(subjects)} target subjects")
        return [str(s) for s in subjects[:devices]]
    if dataset.startswith("fan-"):
        return [FAN_PARTITIONS[i % 2] for i in range(devices)]
    return [str(i) for i in range(devices)]


def _integer(partition: str, dataset: str) -> int:
    try:
        return int(partition)
    except ValueError:
        raise FleetError(f"{dataset} partition {partition!r}: expected a number") from None
