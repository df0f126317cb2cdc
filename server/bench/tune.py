"""`fleet bench tune`: each model's pretraining epochs, fine-tuning epochs and learning rate,
chosen on validation splits of the training data, never on the test split.

For a task and model: a quarter of the source (pretraining) split is held out, the base is
pretrained on the rest and scored on it after each of `PRETRAIN_CHECKPOINTS` epochs, and the
best count is chosen. From that base, a quarter of the fine-tuning split is held out, every
method is fine-tuned on the rest at each learning rate of `LRS`, scored after each of
`FINETUNE_CHECKPOINTS` epochs, and the (learning rate, epochs) with the best validation accuracy
averaged over the methods is chosen: one operating point per model, fair to every method. A run
that diverges scores 0 from then on. A rate is chosen only with a margin: when no method diverged
at it nor at the next rate of the grid, about three times larger (so the grid's largest rate is a
probe, never chosen): a rate at the edge of divergence on the tuning seed diverges on other
trials. Held out are whole runs of consecutive samples of a class (every 4th run of 8), because
neighbouring HAR windows overlap by half: a random quarter would leave near-copies of every
validation sample in the training part.

What it chose for the committed report is `CHOSEN` (docs/results/tune/).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from time import perf_counter
from typing import Annotated

import numpy as np
import typer

from skip2fleet.server import options as opt
from skip2fleet.server.bench.methods import names, task_and_spec
from skip2fleet.server.progress import progress, stderr
from skip2fleet.shared import model as base_model
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.datasets import TASKS as DATASETS
from skip2fleet.shared.datasets import Split
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.methods import Method, parse_methods
from skip2fleet.shared.pretrain import PretrainConfig, pretrain
from skip2fleet.shared.spec import MODELS
from skip2fleet.shared.train import FineTuneConfig, FineTuneResult, fine_tuner, train_epochs

PRETRAIN_CHECKPOINTS = (5, 10, 20, 40, 80)
FINETUNE_CHECKPOINTS = (5, 10, 20, 40, 80)
LRS = (0.003, 0.01, 0.03, 0.1)
RUN, HELD_EVERY = 8, 4  # held out: every 4th run of 8 consecutive samples of a class
BATCH = 20

# (task, model) -> (fine-tuning epochs, pretraining epochs, learning rate), as `fleet bench tune
# --tasks ... --models ...` chose them (docs/results/tune/tune-{1d,digits,har2d}.md); the edge-PEFT
# report's defaults.
CHOSEN: dict[tuple[str, str], tuple[int, int, float]] = {
    ("har", "cnn"): (80, 80, 0.03),
    ("har", "dscnn"): (80, 80, 0.01),
    ("fan-damage1", "cnn"): (80, 40, 0.01),
    ("fan-damage1", "dscnn"): (80, 10, 0.01),
    ("fan-damage2", "cnn"): (80, 80, 0.01),
    ("fan-damage2", "dscnn"): (80, 40, 0.01),
    ("digits", "cnn2d"): (80, 40, 0.03),
    ("digits", "dscnn2d"): (80, 40, 0.03),
    ("digits", "resnet2d"): (80, 80, 0.01),
    ("har", "cnn2d"): (40, 40, 0.01),
    ("har", "dscnn2d"): (40, 80, 0.01),
    ("har", "resnet2d"): (80, 20, 0.01),
}


def validation_split(split: Split) -> tuple[Split, Split]:
    """(training part, held-out part): per class, every 4th run of 8 consecutive samples held."""
    held = np.zeros(len(split), bool)
    for label in np.unique(split.y):
        rows = np.flatnonzero(split.y == label)
        held[rows] = (np.arange(len(rows)) // RUN) % HELD_EVERY == HELD_EVERY - 1
    return Split(split.x[~held], split.y[~held]), Split(split.x[held], split.y[held])


def _best(scores: dict) -> tuple:
    """The key of the highest score; on a tie the first (fewest epochs, lowest rate)."""
    return max(scores, key=lambda key: (scores[key], [-v for v in np.atleast_1d(key)]))


def tune_pair(
    task_name: str,
    model: str,
    methods: list[Method],
    data_dir: Path | None,
    seed: int,
    advance: Callable[[str], None] = lambda label: None,
) -> dict:
    """The validation scores and the chosen operating point of one task and model."""
    started = perf_counter()
    task, spec = task_and_spec(
        task_name, model, data_dir, opt.DEFAULT_SOURCE_ROOM, opt.DEFAULT_SUBJECTS_OPTION, seed
    )
    source, source_held = validation_split(task.pretrain)
    source_scores: dict[int, float] = {}
    bases: dict[int, base_model.Model] = {}

    def checkpoint(epoch: int, model_now: base_model.Model) -> None:
        if epoch + 1 in PRETRAIN_CHECKPOINTS:
            logits = base_model.logits(model_now, source_held.x)
            source_scores[epoch + 1] = base_model.accuracy(logits, source_held.y)
            bases[epoch + 1] = model_now

    config = PretrainConfig(epochs=max(PRETRAIN_CHECKPOINTS), seed=seed)
    pretrain(source.x, source.y, len(task.classes), config, spec=spec, on_model=checkpoint)
    pretrain_epochs = _best(source_scores)
    advance(f"{task_name} {model}: pretraining epochs {pretrain_epochs}")
    base = bases[pretrain_epochs]
    train, held = validation_split(task.finetune)
    scores: dict[str, dict[str, float]] = {}  # "lr epochs" -> method -> validation accuracy
    diverged: dict[float, list[str]] = {lr: [] for lr in LRS}
    for lr in LRS:
        for method in methods:
            found, failed = _fine_tune_scores(base, method, train, held, lr, seed)
            for epochs, accuracy in found.items():
                scores.setdefault(f"{lr} {epochs}", {})[method.name] = accuracy
            if failed:
                diverged[lr].append(method.name)
            advance(f"{task_name} {model}: lr {lr} {method.name}")
    mean = {key: float(np.mean(list(by_method.values()))) for key, by_method in scores.items()}
    eligible = stable_rates(diverged)
    points = {(float(k.split()[0]), int(k.split()[1])): v for k, v in mean.items()}
    lr, epochs = _best({point: v for point, v in points.items() if point[0] in eligible})
    return {
        "task": task_name,
        "model": model,
        "samples": {"source": len(source), "source_held": len(source_held)}
        | {"finetune": len(train), "finetune_held": len(held)},
        "pretrain_scores": source_scores,
        "pretrain_epochs": pretrain_epochs,
        "finetune_scores": scores,
        "finetune_mean": mean,
        "diverged": {str(rate): names for rate, names in diverged.items()},
        "eligible_lrs": eligible,
        "lr": lr,
        "epochs": epochs,
        "seconds": perf_counter() - started,
    }


def stable_rates(diverged: dict[float, list[str]]) -> list[float]:
    """The rates that may be chosen: no method diverged at the rate nor at the next larger one
    (the smallest rate when none is left)."""
    rates = sorted(diverged)
    stable = [r for r, larger in itertools.pairwise(rates) if not (diverged[r] or diverged[larger])]
    return stable or rates[:1]


def _fine_tune_scores(
    base: base_model.Model, method: Method, train: Split, held: Split, lr: float, seed: int
) -> tuple[dict[int, float], bool]:
    """Validation accuracy after each checkpoint's epochs of one fine-tune (0 once diverged), and
    whether it diverged."""
    config = FineTuneConfig(epochs=max(FINETUNE_CHECKPOINTS), batch_size=BATCH, lr=lr, seed=seed)
    tuner = fine_tuner(base, method, config, len(train))
    tuner.attach(train.x, train.y)
    found: dict[int, float] = {}

    def checkpoint(epoch: int) -> None:
        if epoch + 1 in FINETUNE_CHECKPOINTS:
            found[epoch + 1] = base_model.accuracy(tuner.merged()(held.x), held.y)

    try:
        train_epochs(FineTuneResult(tuner), config.epochs, lr, seed, checkpoint)
    except FleetError:  # diverged: what is left scores as nothing learned
        found.update({e: 0.0 for e in FINETUNE_CHECKPOINTS if e not in found})
        return found, True
    return found, False


def tune_markdown(report: dict) -> str:
    lines = [
        "# Operating points chosen on validation splits",
        "",
        f"`fleet bench tune`, seed {report['seed']}, wall {report['wall_seconds']:.0f} s with "
        f"{report['jobs']} process(es). Pretraining epochs: the source split's validation "
        "accuracy (%) after each count; fine-tuning: the validation accuracy (%) of the "
        "fine-tuning split averaged over the methods, per learning rate and epochs; a rate "
        "may be chosen only when no method diverged at it nor at the next one. **Bold**: chosen.",
    ]
    for pair in report["pairs"]:
        lines += ["", f"## {pair['task']} · {pair['model']}", ""]
        lines.append(
            "pretraining: "
            + ", ".join(
                f"**{e}: {s:.2f}**" if int(e) == pair["pretrain_epochs"] else f"{e}: {s:.2f}"
                for e, s in pair["pretrain_scores"].items()
            )
        )
        header = " | ".join(f"{e} epochs" for e in FINETUNE_CHECKPOINTS)
        lines += ["", f"| lr | {header} | diverged | may be chosen |"]
        lines.append("|---" * (len(FINETUNE_CHECKPOINTS) + 3) + "|")
        for lr in LRS:
            cells = []
            for epochs in FINETUNE_CHECKPOINTS:
                value = f"{pair['finetune_mean'][f'{lr} {epochs}']:.2f}"
                chosen = (lr, epochs) == (pair["lr"], pair["epochs"])
                cells.append(f"**{value}**" if chosen else value)
            failed = ", ".join(pair["diverged"][str(lr)]) or "-"
            eligible = "yes" if lr in pair["eligible_lrs"] else "no"
            lines.append(f"| {lr} | " + " | ".join(cells) + f" | {failed} | {eligible} |")
    return "\n".join(lines) + "\n"


def tune_command(
    tasks: Annotated[str, typer.Option(help=f"Comma-separated, of {', '.join(DATASETS)}.")] = "har",
    models: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(MODELS)}.")] = "cnn",
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated method names; default all.")
    ] = None,
    seed: opt.Seed = 0,
    jobs: Annotated[int, typer.Option(min=1, help="Task-model pairs tuned at once.")] = 1,
    data_dir: opt.DataDir = None,
    out_dir: Annotated[
        Path, typer.Option(callback=opt.writable_folder, help="Folder for tune.md and tune.json.")
    ] = Path("bench-out/tune"),
) -> None:
    """Choose pretraining epochs, fine-tuning epochs and learning rate per task and model on
    validation splits of the training data (never the test split)."""
    chosen = parse_methods(methods)
    pairs = [
        (task, model, chosen, data_dir, seed)
        for task in names(tasks, DATASETS, "task")
        for model in names(models, MODELS, "model")
    ]
    steps = len(pairs) * (1 + len(LRS) * len(chosen))
    started = perf_counter()
    found = []
    with progress(steps, "tuning") as advance:
        if jobs == 1:
            found = [tune_pair(*pair, advance=advance) for pair in pairs]
        else:
            with ProcessPoolExecutor(jobs) as pool:
                futures = {pool.submit(tune_pair, *pair): pair for pair in pairs}
                for future in as_completed(futures):
                    found.append(future.result())
                    for _ in range(1 + len(LRS) * len(chosen)):
                        advance(f"{futures[future][0]} {futures[future][1]} done")
    order = [(t, m) for t, m, *_ in pairs]
    found.sort(key=lambda pair: order.index((pair["task"], pair["model"])))
    report = {"seed": seed, "jobs": jobs, "wall_seconds": perf_counter() - started, "pairs": found}
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = tune_markdown(report)
    write_text_atomic(out_dir / "tune.md", markdown)
    write_text_atomic(out_dir / "tune.json", json.dumps(report, indent=2) + "\n")
    typer.echo(markdown)
    for pair in found:
        stderr.print(
            f"{pair['task']} {pair['model']}: pretrain {pair['pretrain_epochs']} epochs, "
            f"fine-tune {pair['epochs']} epochs at lr {pair['lr']}"
        )
