"""`fleet finetune`: one method on one task, on this machine, with its accuracy and time split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from skip2fleet.server import options as opt
from skip2fleet.server.progress import progress
from skip2fleet.server.training.pretraining import pretrain_shown
from skip2fleet.shared import model as base_model
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.cache import Codec
from skip2fleet.shared.datasets import Task, load_task, samples
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.methods import METHODS, get_method
from skip2fleet.shared.pretrain import PretrainConfig
from skip2fleet.shared.spec import describe, form_of, input_form
from skip2fleet.shared.train import FineTuneConfig, finetune


def own_task(folder: Path, model: base_model.Model, label_column: str) -> Task:
    """A user's samples as a device reads them: labelled with the base's classes, the newest
    kept, a share of each class held out for the accuracy."""
    train, held = samples.device_samples(
        folder,
        base_model.classes_of(model),
        label_column,
        samples.DEFAULT_HOLDOUT,
        samples.DEFAULT_MAX_SAMPLES,
    )
    return Task(str(folder), base_model.classes_of(model), train, train, held)


def finetune_command(
    base: Annotated[
        Path | None,
        typer.Option(help="Base model from `fleet pretrain`; without it one is pretrained now."),
    ] = None,
    method: Annotated[str, typer.Option(help=f"One of {', '.join(METHODS)}.")] = "skip2-lora",
    out: Annotated[
        Path | None,
        typer.Option(callback=opt.writable_file, help="Where to write the adapters (.npz)."),
    ] = None,
    dataset: opt.Dataset = opt.DEFAULT_DATASET,
    model_name: opt.ModelName = opt.DEFAULT_MODEL,
    data_dir: opt.DataDir = None,
    epochs: opt.Epochs = opt.DEFAULT_EPOCHS,
    batch_size: opt.BatchSize = opt.DEFAULT_BATCH,
    rank: opt.Rank = opt.DEFAULT_RANK,
    lr: opt.LearningRate = opt.DEFAULT_LR,
    cache: opt.CacheCodec = Codec.F32.value,
    seed: opt.Seed = 0,
    source_room: opt.SourceRoom = opt.DEFAULT_SOURCE_ROOM,
    subjects: opt.Subjects = opt.DEFAULT_SUBJECTS_OPTION,
    json_out: opt.JsonOut = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Your own samples (.npz/.csv files, a folder of them, labelled with the base's "
            "classes) instead of --dataset; needs --base. A quarter of each class is held out "
            "for the accuracy.",
        ),
    ] = None,
    label_column: opt.LabelColumn = samples.DEFAULT_LABEL_COLUMN,
) -> None:
    """Fine-tune one method on the task's target domain (or your own samples) and report
    accuracy and time.

    With --base, the model is the base file's own (its spec), whatever --model says."""
    chosen = get_method(method)
    model = base_model.load(base) if base is not None else None
    if data is not None:
        if model is None:
            raise FleetError("--data: needs --base, the model your samples fine-tune")
        dataset = str(data)
        task = own_task(data, model, label_column)
    else:
        form = form_of(base_model.spec_of(model)) if model is not None else input_form(model_name)
        task = load_task(dataset, opt.task_options(data_dir, source_room, subjects, seed, form))
    if model is None:
        model = pretrain_shown(task, model_name, PretrainConfig().epochs, seed)
    elif base_model.spec_of(model).width != task.n_features:
        raise FleetError(
            f"{base}: the base takes {base_model.spec_of(model).width} values per sample, "
            f"{dataset} has {task.n_features}"
        )
    config = FineTuneConfig(
        epochs=epochs, batch_size=batch_size, rank=rank, lr=lr, seed=seed, cache=Codec(cache)
    )
    with progress(epochs, f"fine-tuning {method}") as advance:
        result = finetune(
            model,
            chosen,
            task.finetune.x,
            task.finetune.y,
            config,
            on_epoch=lambda epoch: advance(f"{method}: epoch {epoch + 1} done"),
        )
    before = base_model.accuracy(base_model.logits(model, task.test.x), task.test.y)
    after = base_model.accuracy(result.tuner.merged()(task.test.x), task.test.y)
    split = result.times.per_batch_ms()
    figures = {
        "dataset": dataset,
        "method": method,
        "model": describe(base_model.spec_of(model)),
        "samples": len(task.finetune),
        "epochs": epochs,
        "accuracy_before": before,
        "accuracy_after": after,
        "train_batch_ms": split,
        "prepare_seconds": result.prepare_seconds,
        "train_seconds": result.train_seconds,
        "wall_seconds": result.prepare_seconds + result.train_seconds,
        "cache": cache,
        "cache_bytes": result.cache_bytes,
        "adapter_parameters": int(result.tuner.theta.size),
    }
    typer.echo(
        f"{method} on {dataset}: accuracy {before:.2f} % -> {after:.2f} % "
        f"({len(task.finetune)} samples, {epochs} epochs)"
    )
    typer.echo(
        f"train per batch {split['total']:.4f} ms (forward {split['forward']:.4f}, "
        f"backward {split['backward']:.4f}, update {split['update']:.4f}); "
        f"wall {figures['wall_seconds']:.2f} s, of which preparing data "
        f"{result.prepare_seconds:.3f} s; cache {result.cache_bytes} bytes"
    )
    if out is not None:
        result.tuner.layout.save(out, result.tuner.theta, base_model.sha256(model))
        typer.echo(f"wrote {out}")
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(figures, indent=2) + "\n")
