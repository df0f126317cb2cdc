"""Benchmark results as Markdown beside the paper's numbers, and as PNG charts."""

from __future__ import annotations

from pathlib import Path

from skip2fleet.server.charts import Chart, legend_beside, pyplot, save_chart

# Skip2-LoRA paper, Raspberry Pi Zero 2 W, C: training time per batch in ms.
PAPER_BATCH_MS = {
    "fan": {
        "ft-all": 5.864,
        "ft-last": 2.633,
        "lora-all": 4.113,
        "lora-last": 2.642,
        "skip-lora": 2.952,
        "skip2-lora": 0.450,
    },
    "har": {
        "ft-all": 11.323,
        "ft-last": 6.179,
        "lora-all": 7.459,
        "lora-last": 6.031,
        "skip-lora": 6.328,
        "skip2-lora": 0.595,
    },
}
# The paper's test accuracy in percent: before fine-tuning, and after, per method (means).
PAPER_ACCURACY = {
    "fan-damage1": {
        "before": 60.61,
        "ft-all": 98.73,
        "ft-last": 94.19,
        "ft-bias": 79.42,
        "ft-all-lora": 98.63,
        "lora-all": 98.26,
        "lora-last": 94.67,
        "skip-lora": 96.07,
        "skip2-lora": 96.19,
    },
    "fan-damage2": {
        "before": 51.86,
        "ft-all": 88.12,
        "ft-last": 92.43,
        "ft-bias": 79.56,
        "ft-all-lora": 88.88,
        "lora-all": 86.45,
        "lora-last": 93.55,
        "skip-lora": 93.24,
        "skip2-lora": 93.46,
    },
    "har": {
        "before": 79.97,
        "ft-all": 90.99,
        "ft-last": 89.31,
        "ft-bias": 82.21,
        "ft-all-lora": 90.40,
        "lora-all": 91.09,
        "lora-last": 89.79,
        "skip-lora": 92.10,
        "skip2-lora": 91.99,
    },
}


def _paper_timing(dataset: str) -> dict[str, float]:
    return PAPER_BATCH_MS["har" if dataset == "har" else "fan"] if dataset != "generated" else {}


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.3f}" if value is not None and reference else "-"


def timing_report(results: dict) -> tuple[str, Chart]:
    methods = results["methods"]
    paper = _paper_timing(results["dataset"])
    lora_all = methods.get("lora-all", {}).get("train_batch_ms", {}).get("total")
    lines = [
        f"### Training time per batch, {results['dataset']} "
        f"(model {results['model']}, batch {results['batch_size']}, "
        f"rank {results['rank']}, median of {results['repeats']} rounds of "
        f"{results['steps_per_run']} steps)",
        "",
        "| method | forward ms | backward ms | update ms | total ms | / LoRA-All | MFLOP/step "
        "| predict ms/sample | paper ms (its MLP, Pi Zero 2 W) | paper / LoRA-All |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in methods.items():
        t = row["train_batch_ms"]
        lines.append(
            f"| {name} | {t['forward']:.4f} | {t['backward']:.4f} | {t['update']:.4f} "
            f"| {t['total']:.4f} | {_ratio(t['total'], lora_all)} "
            f"| {row['flops_per_step'] / 1e6:.3f} | {row['predict_sample_ms']:.4f} "
            f"| {paper.get(name, '-')} | {_ratio(paper.get(name), paper.get('lora-all'))} |"
        )
    cache = {n: r["cache_bytes"] for n, r in methods.items() if r["cache_bytes"]}
    for name, size in cache.items():
        lines += [
            "",
            f"{name} cache: {size} bytes, built in "
            f"{methods[name]['prepare_seconds'] * 1e3:.1f} ms.",
        ]

    def chart(path: Path) -> None:
        plt = pyplot()
        names = list(methods)
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
        left = [0.0] * len(names)
        for phase, colour in (
            ("forward", "#4c72b0"),
            ("backward", "#dd8452"),
            ("update", "#55a868"),
        ):
            widths = [methods[n]["train_batch_ms"][phase] * 1e3 for n in names]
            ax.barh(names, widths, left=left, color=colour, label=phase)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.invert_yaxis()
        ax.set_xlabel("microseconds per training batch")
        ax.set_title(f"{results['dataset']}: time per batch of {results['batch_size']}")
        legend_beside(ax)
        save_chart(fig, path)

    return "\n".join(lines) + "\n", chart


def accuracy_report(results: dict) -> tuple[str, Chart]:
    paper = PAPER_ACCURACY.get(results["dataset"], {})
    before = results["before"]
    lines = [
        f"### Test accuracy, {results['dataset']}, model {results['model']} "
        f"({results['trials']} trials, "
        f"{results['epochs']} epochs, lr {results['lr']}, rank {results['rank']}, "
        f"batch {results['batch_size']}; {results['samples']['finetune']} fine-tune and "
        f"{results['samples']['test']} test samples)",
        "",
        "| method | accuracy % (mean ± std) | after - before | paper % (its MLP) |",
        "|---|---:|---:|---:|",
        f"| before fine-tuning | {before['mean']:.2f} ± {before['std']:.2f} | "
        f"| {paper.get('before', '-')} |",
    ]
    for name, row in results["methods"].items():
        lines.append(
            f"| {name} | {row['mean']:.2f} ± {row['std']:.2f} "
            f"| {row['mean'] - before['mean']:+.2f} | {paper.get(name, '-')} |"
        )

    def chart(path: Path) -> None:
        plt = pyplot()
        names = list(results["methods"])
        means = [results["methods"][n]["mean"] for n in names]
        stds = [results["methods"][n]["std"] for n in names]
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.bar(names, means, yerr=stds, color="#4c72b0", capsize=3, label="after fine-tuning")
        if paper:
            ax.scatter(
                names,
                [paper.get(n) for n in names],
                color="black",
                marker="_",
                s=300,
                zorder=3,
                label="paper",
            )
        ax.axhline(before["mean"], color="#c44e52", linestyle="--", label="before fine-tuning")
        ax.set_ylabel("test accuracy %")
        ax.set_ylim(max(0.0, min([*means, before["mean"]]) - 10), 100)
        ax.set_title(f"{results['dataset']}: accuracy over {results['trials']} trials")
        ax.tick_params(axis="x", rotation=30)
        legend_beside(ax)
        save_chart(fig, path)

    return "\n".join(lines) + "\n", chart
