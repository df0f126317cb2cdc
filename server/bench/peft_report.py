"""The edge-PEFT report's Markdown tables and PNG charts, from its rows (`server.bench.peft`)."""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

from skip2fleet.server.bench.costs import MEMORY_CATEGORIES
from skip2fleet.server.charts import legend_beside, log_scale, pyplot, save_chart
from skip2fleet.shared.cache import Codec
from skip2fleet.shared.flops import CATEGORIES

KIB = 1024


def variant_label(method: str, cache: str | None) -> str:
    """A method's name, with the cache codec when it is not the exact one."""
    return method + ("" if cache in (None, Codec.F32) else f" {cache}")


def label(row: dict) -> str:
    return variant_label(row["method"], row["cache"])


def _pairs(rows: list[dict]):
    return groupby(rows, key=lambda r: (r["task"], r["model"]))


def peft_markdown(report: dict) -> str:
    lines = [
        "# Edge-PEFT report",
        "",
        f"{report['trials']} trials (a new base each), wall {report['wall_seconds']:.0f} s with "
        f"{report['jobs']} process(es). **Accuracy**: test %, mean ± std over the trials (change "
        "from the base). **ms**: train time per batch of 20, median over the trials. **MFLOP** per "
        "step at batch 20 (a multiply-add is 2): forward / input gradient / weight gradient / "
        "update / SVD (GaLore, estimated, amortised) = total. **Peak**: tracemalloc's peak over "
        "2 steps, KiB, at batch 20 and at batch 1, everything alive included; **held**: the "
        "arrays held after a step at batch 20 by category, KiB: weights / trainable / gradients / "
        "optimizer / activations / data or cache. **Sent**: bytes of adapters a device sends per "
        "round (float32).",
    ]
    if report.get("partial"):
        lines += [
            "",
            "**Partial**: written after each trial while the run went on; each section "
            "states the trials it holds.",
        ]
    for (task, model), group in _pairs(report["rows"]):
        group = list(group)
        first = group[0]
        before = first["before"]
        lines += [
            "",
            f"## {task} · {model}",
            "",
            f"{first['trials']} trials; {first['samples']['finetune']} fine-tuning and "
            f"{first['samples']['test']} test samples; {first['epochs']} epochs at lr "
            f"{first['lr']}, base pretrained {first['pretrain_epochs']} epochs: before "
            f"fine-tuning {before['mean']:.2f} ± {before['std']:.2f} %.",
            "",
            "| method | accuracy % | ms | MFLOP fwd / in / wt / upd / svd = total | peak KiB "
            "b20 | held KiB w / t / g / o / a / d | peak KiB b1 | params | sent B | cache B |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in group:
            acc, flops, memory = row["accuracy"], row["flops"], row["memory"]
            split = " / ".join(f"{flops[c] / 1e6:.2f}" for c in CATEGORIES)
            held = " / ".join(f"{memory[c] / KIB:.0f}" for c in MEMORY_CATEGORIES)
            lines.append(
                f"| {label(row)} | {acc['mean']:.2f} ± {acc['std']:.2f} "
                f"({acc['mean'] - before['mean']:+.1f}) | {row['train_batch_ms']:.4f} | {split} = "
                f"{flops['total'] / 1e6:.2f} | {row['peak_bytes'] / KIB:.0f} | {held} | "
                f"{row['batch1']['peak_bytes'] / KIB:.0f} | {row['params']:,} | "
                f"{row['bytes_sent']:,} | {row['cache_bytes']:,} |"
            )
    return "\n".join(lines) + "\n"


def peft_charts(rows: list[dict], out_dir: Path) -> list[Path]:
    """Per task: accuracy against peak memory, and stacked FLOP bars, a panel per model."""
    plt = pyplot()
    written = []
    for task, task_rows in groupby(rows, key=lambda r: r["task"]):
        by_model = [(m, list(g)) for m, g in groupby(task_rows, key=lambda r: r["model"])]
        fig, axes = plt.subplots(
            1, len(by_model), figsize=(5.5 * len(by_model), 4.6), squeeze=False
        )
        for ax, (model, group) in zip(axes[0], by_model, strict=True):
            for row in group:
                acc = row["accuracy"]
                ax.errorbar(row["peak_bytes"] / KIB, acc["mean"], yerr=acc["std"], fmt="o")
                ax.annotate(label(row), (row["peak_bytes"] / KIB, acc["mean"]), fontsize=7)
            log_scale(ax, [r["peak_bytes"] / KIB for r in group], "x")
            ax.set(title=f"{task} · {model}", xlabel="peak memory at batch 20, KiB (log)")
            ax.set_ylabel("test accuracy %")
        path = out_dir / f"peft-{task}-accuracy-memory.png"
        save_chart(fig, path)
        written.append(path)

        fig, axes = plt.subplots(
            1, len(by_model), figsize=(5.5 * len(by_model), 4.6), squeeze=False
        )
        for ax, (model, group) in zip(axes[0], by_model, strict=True):
            names = [label(r) for r in group]
            left = [0.0] * len(group)
            for category in CATEGORIES:
                values = [r["flops"][category] / 1e6 for r in group]
                ax.barh(names, values, left=left, label=category)
                left = [a + b for a, b in zip(left, values, strict=True)]
            ax.invert_yaxis()
            ax.set(title=f"{task} · {model}", xlabel="MFLOP per training step (batch 20)")
        legend_beside(axes[0][-1])
        path = out_dir / f"peft-{task}-flops.png"
        save_chart(fig, path)
        written.append(path)
    return written
