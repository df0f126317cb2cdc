"""`fleet bench timing` and `fleet bench accuracy`: the paper's two tables, measured here.

Timing runs every method in one process, round-robin over `--repeats` rounds so that a noisy
neighbour hits all methods alike, and reports each figure's median over the rounds. Accuracy
pretrains a base per trial (seed + trial), fine-tunes every method from it, and tests on the
held-out target split; mean and standard deviation are over trials.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from statistics import median
from time import perf_counter
from typing import Annotated

import numpy as np
import typer

from skip2fleet.server import options as opt
from skip2fleet.server.bench.costs import step_flops
from skip2fleet.server.bench.report import accuracy_report, timing_report
from skip2fleet.server.progress import progress
from skip2fleet.shared import model as base_model
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.datasets import Task, load_task
from skip2fleet.shared.methods import Method, parse_methods
from skip2fleet.shared.model import Model
from skip2fleet.shared.predictor import Predictor
from skip2fleet.shared.pretrain import PretrainConfig, pretrain
from skip2fleet.shared.spec import Spec, build, describe, input_form
from skip2fleet.shared.train import FineTuneConfig, finetune

Methods = Annotated[str | None, typer.Option(help="Comma-separated method names; default all.")]
OutDir = Annotated[
    Path,
    typer.Option(
        callback=opt.writable_folder, help="Folder for the Markdown table and the PNG chart."
    ),
]
PREDICT_ROWS = 200


def predict_sample_ms(predict: Predictor, x: np.ndarray) -> float:
    """Milliseconds to classify one sample, as a device does with each new reading."""
    rows = [x[i : i + 1] for i in range(min(PREDICT_ROWS, len(x)))]
    started = perf_counter()
    for row in rows:
        predict(row)
    return 1e3 * (perf_counter() - started) / len(rows)


def measure_timing(
    task: Task, spec: Spec, methods: list[Method], config: FineTuneConfig, repeats: int
) -> dict:
    # Timing does not depend on how well the base is trained; one epoch gives real BN statistics.
    base = pretrain(
        task.pretrain.x, task.pretrain.y, len(task.classes), PretrainConfig(epochs=1), spec=spec
    )
    runs: dict[str, list[dict]] = {m.name: [] for m in methods}
    with progress(repeats * len(methods), "timing") as advance:
        for repeat in range(repeats):
            for method in methods[repeat % len(methods) :] + methods[: repeat % len(methods)]:
                result = finetune(base, method, task.finetune.x, task.finetune.y, config)
                runs[method.name].append(
                    {
                        **result.times.per_batch_ms(),
                        "predict": predict_sample_ms(result.tuner.merged(), task.test.x),
                        "prepare_s": result.prepare_seconds,
                        "flops": step_flops(result.tuner)["total"],
                        "cache_bytes": result.cache_bytes,
                    }
                )
                advance(f"round {repeat + 1}: timed {method.name}")
    table = {}
    for name, rounds in runs.items():
        mid = {key: median(r[key] for r in rounds) for key in rounds[0]}
        table[name] = {
            "train_batch_ms": {k: mid[k] for k in ("forward", "backward", "update", "total")},
            "predict_sample_ms": mid["predict"],
            "flops_per_step": int(mid["flops"]),
            "prepare_seconds": mid["prepare_s"],
            "cache_bytes": int(mid["cache_bytes"]),
        }
    return {
        "dataset": task.name,
        "model": describe(spec),
        "batch_size": config.batch_size,
        "rank": config.rank,
        "epochs": config.epochs,
        "repeats": repeats,
        "steps_per_run": (len(task.finetune) // config.batch_size) * config.epochs,
        "methods": table,
    }


def pretrained_trials(
    task: Task, spec: Spec, trials: int, pretrain_epochs: int, seed: int
) -> Iterator[tuple[int, Model, float]]:
    """(trial, a base pretrained with seed + trial, its test accuracy) for each trial."""
    for trial in range(trials):
        base = pretrain(
            task.pretrain.x,
            task.pretrain.y,
            len(task.classes),
            PretrainConfig(epochs=pretrain_epochs, seed=seed + trial),
            spec=spec,
        )
        yield trial, base, base_model.accuracy(base_model.logits(base, task.test.x), task.test.y)


def summary(values: list[float]) -> dict:
    """Mean and standard deviation over trials, and the trials' values."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "trials": values}


def measure_accuracy(
    task: Task,
    spec: Spec,
    methods: list[Method],
    config: FineTuneConfig,
    trials: int,
    pretrain_epochs: int,
) -> dict:
    before: list[float] = []
    after: dict[str, list[float]] = {m.name: [] for m in methods}
    with progress(trials * (len(methods) + 1), "accuracy") as advance:
        for trial, base, accuracy in pretrained_trials(
            task, spec, trials, pretrain_epochs, config.seed
        ):
            before.append(accuracy)
            advance(f"trial {trial + 1}: pretrained")
            trial_config = dataclasses.replace(config, seed=config.seed + trial)
            for method in methods:
                result = finetune(base, method, task.finetune.x, task.finetune.y, trial_config)
                after[method.name].append(
                    base_model.accuracy(result.tuner.merged()(task.test.x), task.test.y)
                )
                advance(f"trial {trial + 1}: {method.name}")
    return {
        "dataset": task.name,
        "model": describe(spec),
        "trials": trials,
        "epochs": config.epochs,
        "lr": config.lr,
        "rank": config.rank,
        "batch_size": config.batch_size,
        "samples": {"finetune": len(task.finetune), "test": len(task.test)},
        "before": summary(before),
        "methods": {name: summary(values) for name, values in after.items()},
    }


def _write(results: dict, kind: str, out_dir: Path, json_out: Path | None) -> None:
    markdown, chart = (timing_report if kind == "timing" else accuracy_report)(results)
    model = results["model_name"]
    stem = f"{kind}-{results['dataset']}" + ("" if model == "mlp" else f"-{model}")
    chart(out_dir / f"{stem}.png")  # first: it is the part that can fail (no matplotlib)
    write_text_atomic(out_dir / f"{stem}.md", markdown)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(results, indent=2) + "\n")
    typer.echo(markdown)
    typer.echo(f"wrote {out_dir / stem}.md and .png" + (f", {json_out}" if json_out else ""))


def names(text: str, known: tuple[str, ...] | list[str], what: str) -> list[str]:
    """Comma-separated names, each one of `known`."""
    found = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in found if n not in known]
    if unknown or not found:
        raise typer.BadParameter(f"unknown {what} {', '.join(unknown) or '(none)'}")
    return found


def task_and_spec(
    dataset: str, model: str, data_dir: Path | None, source_room: str, subjects: str, seed: int
) -> tuple[Task, Spec]:
    """The task in the form the model reads, and the model's spec for it."""
    options = opt.task_options(data_dir, source_room, subjects, seed, input_form(model))
    task = load_task(dataset, options)
    return task, build(model, task.input_shape, len(task.classes))


def timing_command(
    dataset: opt.Dataset = opt.DEFAULT_DATASET,
    model: opt.ModelName = opt.DEFAULT_MODEL,
    data_dir: opt.DataDir = None,
    methods: Methods = None,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per timed run.")] = 20,
    repeats: Annotated[int, typer.Option(min=1, help="Rounds over all methods.")] = 5,
    batch_size: opt.BatchSize = opt.DEFAULT_BATCH,
    rank: opt.Rank = opt.DEFAULT_RANK,
    seed: opt.Seed = 0,
    source_room: opt.SourceRoom = opt.DEFAULT_SOURCE_ROOM,
    subjects: opt.Subjects = opt.DEFAULT_SUBJECTS_OPTION,
    out_dir: OutDir = Path("bench-out"),
    json_out: opt.JsonOut = None,
) -> None:
    """Time per training batch (forward / backward / update) and per prediction, all methods."""
    chosen = parse_methods(methods)
    task, spec = task_and_spec(dataset, model, data_dir, source_room, subjects, seed)
    config = FineTuneConfig(epochs=epochs, batch_size=batch_size, rank=rank, seed=seed)
    results = {**measure_timing(task, spec, chosen, config, repeats), "model_name": model}
    _write(results, "timing", out_dir, json_out)


def accuracy_command(
    dataset: opt.Dataset = opt.DEFAULT_DATASET,
    model: opt.ModelName = opt.DEFAULT_MODEL,
    data_dir: opt.DataDir = None,
    methods: Methods = None,
    trials: Annotated[int, typer.Option(min=1, help="Independent trials (seed + trial).")] = 10,
    epochs: opt.Epochs = opt.DEFAULT_EPOCHS,
    batch_size: opt.BatchSize = opt.DEFAULT_BATCH,
    rank: opt.Rank = opt.DEFAULT_RANK,
    lr: opt.LearningRate = opt.DEFAULT_LR,
    pretrain_epochs: opt.PretrainEpochs = PretrainConfig().epochs,
    seed: opt.Seed = 0,
    source_room: opt.SourceRoom = opt.DEFAULT_SOURCE_ROOM,
    subjects: opt.Subjects = opt.DEFAULT_SUBJECTS_OPTION,
    out_dir: OutDir = Path("bench-out"),
    json_out: opt.JsonOut = None,
) -> None:
    """Test accuracy before and after fine-tuning, every method, mean and std over trials."""
    chosen = parse_methods(methods)
    task, spec = task_and_spec(dataset, model, data_dir, source_room, subjects, seed)
    config = FineTuneConfig(epochs=epochs, batch_size=batch_size, rank=rank, lr=lr, seed=seed)
    results = measure_accuracy(task, spec, chosen, config, trials, pretrain_epochs)
    results["model_name"] = model
    _write(results, "accuracy", out_dir, json_out)
