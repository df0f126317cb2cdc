"""`fleet bench peft`: the edge-PEFT report, every method of the registry on every model and task.

For each task and model: accuracy over trials (a new base per trial, seed + trial, tested on the
held-out target split, as `fleet bench accuracy`), and for each method what a step costs (FLOPs by
category, train time per batch, peak memory measured and broken down at batch 20 and at batch 1,
seed 2's setting), trainable parameters, the bytes a device sends per round and the cache bytes.
Skip2-LoRA runs with each cache codec. Costs are measured on the first trial's base; the train
time per batch is the median over the trials' fine-tunes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from statistics import median
from time import perf_counter
from typing import Annotated

import typer

from skip2fleet.server import options as opt
from skip2fleet.server.bench.costs import measure_memory, step_flops
from skip2fleet.server.bench.methods import names, pretrained_trials, summary, task_and_spec
from skip2fleet.server.bench.peft_report import peft_charts, peft_markdown, variant_label
from skip2fleet.server.bench.tune import CHOSEN
from skip2fleet.server.progress import progress, stderr
from skip2fleet.shared import model as base_model
from skip2fleet.shared.atomic import write_text_atomic
from skip2fleet.shared.cache import Codec
from skip2fleet.shared.datasets import TASKS as DATASETS
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import Method, parse_methods
from skip2fleet.shared.spec import MODELS
from skip2fleet.shared.train import FineTuneConfig, finetune

TASKS = ("har", "fan-damage1", "fan-damage2")  # the report's; `generated` runs too (tests)
PAPER_BATCH, STUDY_BATCH = 20, 1  # the Skip2-LoRA paper's batch; the edge-PEFT study's


@dataclasses.dataclass(frozen=True)
class Variant:
    """A method, and for Skip2-LoRA the codec of its cache."""

    method: Method
    cache: Codec | None = None

    @property
    def label(self) -> str:
        return variant_label(self.method.name, self.cache)


def variants(methods: list[Method]) -> list[Variant]:
    """Every method once; a cached method once per codec."""
    return [Variant(m, codec) for m in methods for codec in (tuple(Codec) if m.cached else (None,))]


def operating_point(task: str, model: str) -> tuple[int, int, float]:
    """(fine-tuning epochs, pretraining epochs, lr): what `fleet bench tune` chose on validation
    splits (`tune.CHOSEN`), else the first report's: the MLP fine-tunes 100 epochs (fleet.yaml's
    per round) from 30 of pretraining, the CNNs 30 / 30, all at lr 0.01."""
    if (task, model) in CHOSEN:
        return CHOSEN[(task, model)]
    if model == "mlp":
        return 100, 30, opt.DEFAULT_LR
    return 30, 30, opt.DEFAULT_LR


def measure_pair(
    task_name: str,
    model: str,
    chosen: list[Variant],
    config: FineTuneConfig,
    trials: int,
    pretrain_epochs: int,
    data_dir: Path | None,
    advance: Callable[[str], None] = lambda label: None,
    on_trial: Callable[[list[dict]], None] = lambda rows: None,
) -> list[dict]:
    """One report row per variant, for one task and model; `on_trial` gets the rows of the
    trials done so far after each one."""
    task, spec = task_and_spec(
        task_name, model, data_dir, opt.DEFAULT_SOURCE_ROOM, opt.DEFAULT_SUBJECTS_OPTION, 0
    )
    x, y = task.finetune.x, task.finetune.y
    before: list[float] = []
    accuracy: dict[str, list[float]] = {v.label: [] for v in chosen}
    batch_ms: dict[str, list[float]] = {v.label: [] for v in chosen}
    costs: dict[str, dict] = {}

    def rows_so_far() -> list[dict]:
        """The report's rows for the trials done."""
        rows = []
        for v in chosen:
            cost = costs[v.label]
            memory = cost["memory_batch20"]
            rows.append(
                {
                    "task": task_name,
                    "model": model,
                    "method": v.method.name,
                    "cache": v.cache,
                    "accuracy": summary(accuracy[v.label]),
                    "before": summary(before),
                    "flops": cost["flops"],
                    "peak_bytes": memory["peak_bytes"],
                    "memory": memory["memory"],
                    "memory_sum": memory["sum"],
                    "batch1": cost["memory_batch1"],
                    "train_batch_ms": median(batch_ms[v.label]),
                    "params": cost["params"],
                    "bytes_sent": 4 * cost["params"],  # float32 on the wire (shared.records)
                    "cache_bytes": cost["cache_bytes"],
                    "epochs": config.epochs,
                    "pretrain_epochs": pretrain_epochs,
                    "lr": config.lr,
                    "trials": len(before),
                    "samples": {"finetune": len(task.finetune), "test": len(task.test)},
                }
            )
        return rows

    for trial, base, base_accuracy in pretrained_trials(
        task, spec, trials, pretrain_epochs, config.seed
    ):
        before.append(base_accuracy)
        for v in chosen:
            run = dataclasses.replace(config, seed=config.seed + trial, cache=v.cache or Codec.F32)
            result = finetune(base, v.method, x, y, run)
            merged = result.tuner.merged()
            accuracy[v.label].append(base_model.accuracy(merged(task.test.x), task.test.y))
            batch_ms[v.label].append(result.times.per_batch_ms()["total"])
            if trial == 0:
                costs[v.label] = {
                    "flops": step_flops(result.tuner),
                    "memory_batch20": measure_memory(
                        base, v.method, x, y, PAPER_BATCH, config.rank, run.cache
                    ),
                    "memory_batch1": measure_memory(
                        base, v.method, x, y, STUDY_BATCH, config.rank, run.cache
                    ),
                    "params": layout(v.method, spec, config.rank).size,
                    "cache_bytes": result.cache_bytes,
                }
            advance(f"{task_name} {model} trial {trial + 1}: {v.label}")
        on_trial(rows_so_far())
    return rows_so_far()


def peft_command(
    tasks: Annotated[
        str, typer.Option(help=f"Comma-separated, of {', '.join(DATASETS)}.")
    ] = ",".join(TASKS),
    models: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(MODELS)}.")] = ",".join(
        MODELS
    ),
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated method names; default all.")
    ] = None,
    trials: Annotated[int, typer.Option(min=1, help="Trials, a new base each.")] = 10,
    epochs: Annotated[
        int | None,
        typer.Option(min=1, help="Fine-tuning epochs for every pair (default: per model)."),
    ] = None,
    pretrain_epochs: Annotated[
        int | None,
        typer.Option(min=1, help="Pretraining epochs for every pair (default: per model)."),
    ] = None,
    rank: opt.Rank = opt.DEFAULT_RANK,
    lr: Annotated[
        float | None,
        typer.Option(
            callback=opt.check_optional_lr,
            help="SGD learning rate for every pair (default: per model, as `fleet bench tune` "
            "chose it).",
        ),
    ] = None,
    seed: opt.Seed = 0,
    jobs: Annotated[
        int, typer.Option(min=1, help="Task-model pairs measured at once (processes).")
    ] = 1,
    data_dir: opt.DataDir = None,
    out_dir: Annotated[
        Path,
        typer.Option(callback=opt.writable_folder, help="Folder for the tables, JSON and charts."),
    ] = Path("bench-out/peft"),
) -> None:
    """The edge-PEFT report: accuracy, FLOPs, time and peak memory of every method, every model,
    every task; Skip2-LoRA with f32, int8 and int4 caches."""
    task_names = names(tasks, DATASETS, "task")
    model_names = names(models, MODELS, "model")
    chosen = variants(parse_methods(methods))
    config = FineTuneConfig(batch_size=PAPER_BATCH, rank=rank, seed=seed)
    pairs = []
    for task_name in task_names:
        for model in model_names:
            tune, pre, tuned_lr = operating_point(task_name, model)
            run = dataclasses.replace(config, epochs=epochs or tune, lr=lr or tuned_lr)
            pairs.append((task_name, model, chosen, run, trials, pretrain_epochs or pre, data_dir))
    started = perf_counter()
    rows: list[dict] = []
    out_dir.mkdir(parents=True, exist_ok=True)

    def write_partial(partial: list[dict]) -> None:
        """Everything measured so far, written after each trial (after each pair with --jobs):
        a long run stopped early keeps what it measured (each section states how many trials)."""
        report = {"wall_seconds": perf_counter() - started, "trials": trials, "jobs": jobs}
        report |= {"partial": True, "rows": rows + partial}
        write_text_atomic(out_dir / "peft.md", peft_markdown(report))
        write_text_atomic(out_dir / "peft.json", json.dumps(report, indent=2) + "\n")

    with progress(len(pairs) * trials * len(chosen), "peft report") as advance:
        if jobs == 1:
            for pair in pairs:
                rows += measure_pair(*pair, advance=advance, on_trial=write_partial)
        else:
            with ProcessPoolExecutor(jobs) as pool:
                futures = {pool.submit(measure_pair, *pair): pair for pair in pairs}
                for future in as_completed(futures):
                    rows += future.result()
                    write_partial([])
                    for _ in range(trials * len(chosen)):
                        advance(f"{futures[future][0]} {futures[future][1]} done")
    wall = perf_counter() - started
    order = {(t, m): i for i, (t, m, *_) in enumerate(pairs)}
    rows.sort(key=lambda r: order[(r["task"], r["model"])])
    report = {"wall_seconds": wall, "trials": trials, "jobs": jobs, "rows": rows}
    peft_charts(rows, out_dir)
    markdown = peft_markdown(report)
    write_text_atomic(out_dir / "peft.md", markdown)
    write_text_atomic(out_dir / "peft.json", json.dumps(report, indent=2) + "\n")
    typer.echo(markdown)
    stderr.print(f"wrote {out_dir}/peft.md, peft.json and the charts; wall {wall:.0f} s")
