"""`fleet`: the command line. Only wiring lives here; the work is in the modules it calls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from client.agent import agent_command
from server import options as opt
from server.bench import bench_app
from server.bench_federated import federated_command
from server.bench_monitor import monitor_command as monitor_bench_command
from server.deploy import deploy_command, status_command
from server.monitoring import monitor_app
from server.pretraining import pretrain_shown
from server.progress import progress, stderr
from server.run import certs_command, run_command
from server.simulate import simulate_command
from shared import model as base_model
from shared.adapters import save_adapters
from shared.atomic import write_text_atomic
from shared.datasets import load_task
from shared.errors import FleetError
from shared.methods import METHODS, get_method
from shared.pretrain import PretrainConfig
from shared.train import FineTuneConfig, finetune


class _FleetGroup(TyperGroup):
    """Turns a `FleetError` anywhere below into one line on stderr and exit code 2."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except FleetError as exc:
            stderr.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_FleetGroup,
    no_args_is_help=True,
    add_completion=False,
    help="skip2fleet: fine-tune small models on fleets of edge devices with Skip2-LoRA.",
)
bench_app.command("monitor")(monitor_bench_command)
bench_app.command("federated")(federated_command)
app.add_typer(bench_app, name="bench")
app.add_typer(monitor_app, name="monitor")
app.command("simulate")(simulate_command)
app.command("run")(run_command)
app.command("certs")(certs_command)
app.command("agent")(agent_command)
app.command("deploy")(deploy_command)
app.command("status")(status_command)


@app.command("pretrain")
def pretrain_command(
    out: Annotated[Path, typer.Option(help="Where to write the base model (.npz).")] = Path(
        "base.npz"
    ),
    dataset: opt.Dataset = opt.DEFAULT_DATASET,
    data_dir: opt.DataDir = None,
    epochs: opt.PretrainEpochs = PretrainConfig().epochs,
    seed: opt.Seed = 0,
    source_room: opt.SourceRoom = "silentA",
    subjects: opt.Subjects = opt.DEFAULT_SUBJECTS,
) -> None:
    """Pretrain the base model on the task's source domain and save it with its sha256."""
    task = load_task(dataset, opt.task_options(data_dir, source_room, subjects, seed))
    model = pretrain_shown(task.pretrain, len(task.classes), task.name, epochs, seed)
    digest = base_model.save(model, out)
    source = base_model.accuracy(
        base_model.forward_frozen(model, task.pretrain.x)[-1], task.pretrain.y
    )
    target = base_model.accuracy(base_model.forward_frozen(model, task.test.x)[-1], task.test.y)
    typer.echo(f"wrote {out} (sha256 {digest})")
    typer.echo(
        f"accuracy on the source domain {source:.2f} %, on the target test split {target:.2f} %"
    )


@app.command("finetune")
def finetune_command(
    base: Annotated[
        Path | None,
        typer.Option(help="Base model from `fleet pretrain`; without it one is pretrained now."),
    ] = None,
    method: Annotated[str, typer.Option(help=f"One of {', '.join(METHODS)}.")] = "skip2-lora",
    out: Annotated[Path | None, typer.Option(help="Where to write the adapters (.npz).")] = None,
    dataset: opt.Dataset = opt.DEFAULT_DATASET,
    data_dir: opt.DataDir = None,
    epochs: opt.Epochs = opt.DEFAULT_EPOCHS,
    batch_size: opt.BatchSize = opt.DEFAULT_BATCH,
    rank: opt.Rank = opt.DEFAULT_RANK,
    lr: opt.LearningRate = opt.DEFAULT_LR,
    seed: opt.Seed = 0,
    source_room: opt.SourceRoom = "silentA",
    subjects: opt.Subjects = opt.DEFAULT_SUBJECTS,
    json_out: opt.JsonOut = None,
) -> None:
    """Fine-tune one method on the task's target domain and report accuracy and time."""
    chosen = get_method(method)
    task = load_task(dataset, opt.task_options(data_dir, source_room, subjects, seed))
    if base is None:
        model = pretrain_shown(
            task.pretrain, len(task.classes), task.name, PretrainConfig().epochs, seed
        )
    else:
        model = base_model.load(base)
        if base_model.dims(model)[0] != task.n_features:
            raise FleetError(
                f"{base}: the base takes {base_model.dims(model)[0]} features, "
                f"{dataset} has {task.n_features}"
            )
    config = FineTuneConfig(epochs, batch_size, rank, None, lr, seed)
    with progress(epochs, f"fine-tuning {method}") as advance:
        result = finetune(
            model,
            chosen,
            task.finetune.x,
            task.finetune.y,
            config,
            on_epoch=lambda epoch: advance(f"{method}: epoch {epoch + 1} done"),
        )
    before = base_model.accuracy(base_model.forward_frozen(model, task.test.x)[-1], task.test.y)
    after = base_model.accuracy(result.tuner.merged()(task.test.x), task.test.y)
    split = result.times.per_batch_ms()
    figures = {
        "dataset": dataset,
        "method": method,
        "samples": len(task.finetune),
        "epochs": epochs,
        "accuracy_before": before,
        "accuracy_after": after,
        "train_batch_ms": split,
        "prepare_seconds": result.prepare_seconds,
        "train_seconds": result.train_seconds,
        "wall_seconds": result.prepare_seconds + result.train_seconds,
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
        save_adapters(out, result.tuner.adapters(), method, rank, base_model.sha256(model))
        typer.echo(f"wrote {out}")
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":  # `python -m server.cli`, as the coordinator role calls it
    app()
