"""What a federated run shows: a row per round as it completes, and the run's summary."""

from __future__ import annotations

from pathlib import Path

import typer

from skip2fleet.server.charts import Chart, legend_beside, log_scale, pyplot, save_chart


def federated_report(summary: dict) -> tuple[str, Chart]:
    """Per device: accuracy before and after (last round); per round: time and bytes."""
    rounds = summary["rounds"]
    last = rounds[-1]["devices"]
    ratio = summary["full_model_bytes"] / summary["adapter_bytes"]
    lines = [
        f"### Federated fine-tuning, {summary['dataset']}: {summary['devices']} devices, "
        f"{len(rounds)} rounds, {summary['method']}, aggregation {summary['aggregation']}",
        "",
        f"Full model {summary['full_model_bytes']} bytes; packed adapters "
        f"{summary['adapter_bytes']} bytes (1/{ratio:.1f} of the model). "
        f"Wall {summary['wall_s']:.1f} s.",
        "",
        "| device | accuracy before % | after % | active | train batch ms | uplink bytes |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, d in last.items():
        lines.append(
            f"| {name} | {d['acc_before']:.2f} | {d['acc_after']:.2f} "
            f"| {'new' if kept_new(d) else 'kept'} | {d['train_batch_ms']:.4f} "
            f"| {d['uplink_bytes']:.0f} |"
        )
    lines += [
        "",
        "| round | duration s | devices | refused | missing | max uplink bytes |",
        "|---:|---:|---:|---|---|---:|",
    ]
    for r in rounds:
        uplink = max((d["uplink_bytes"] for d in r["devices"].values()), default=0)
        lines.append(
            f"| {r['round']} | {r['duration_s']:.1f} | {len(r['devices'])} "
            f"| {', '.join(r['refused']) or '-'} | {', '.join(r['missing']) or '-'} "
            f"| {uplink:.0f} |"
        )

    def chart(path: Path) -> None:
        plt = pyplot()
        fig, (acc, dur, up) = plt.subplots(1, 3, figsize=(13, 4))
        names = list(last)
        xs = range(len(names))
        acc.bar(
            [x - 0.2 for x in xs],
            [last[n]["acc_before"] for n in names],
            0.4,
            color="#c44e52",
            label="before",
        )
        acc.bar(
            [x + 0.2 for x in xs],
            [last[n]["acc_after"] for n in names],
            0.4,
            color="#4c72b0",
            label="after",
        )
        acc.set_xticks(list(xs), names, rotation=45)
        acc.set_ylabel("test accuracy % (own data)")
        acc.set_title(f"per device, after round {rounds[-1]['round']}")
        legend_beside(acc)
        numbers = [r["round"] for r in rounds]
        dur.bar(numbers, [r["duration_s"] for r in rounds], color="#55a868")
        dur.set_ylabel("seconds")
        dur.set_title("time per round")
        down = [sum(r["downlink_bytes"].values()) for r in rounds]
        sent = [sum(d["uplink_bytes"] for d in r["devices"].values()) for r in rounds]
        up.bar([n - 0.2 for n in numbers], down, 0.4, color="#937860", label="to devices")
        up.bar([n + 0.2 for n in numbers], sent, 0.4, color="#8172b3", label="from devices")
        up.axhline(
            summary["full_model_bytes"], color="black", linestyle="--", label="one full model"
        )
        log_scale(up, [*down, *sent, summary["full_model_bytes"]])
        up.set_ylabel("bytes, all devices")
        up.set_title("bytes per round")
        legend_beside(up)
        for axis in (dur, up):
            axis.set_xticks(numbers)
            axis.set_xlabel("round")
        save_chart(fig, path)

    return "\n".join(lines) + "\n", chart


def kept_new(figures: dict) -> bool:
    """Whether the device made this round's adapters active (older run folders: yes)."""
    return bool(figures.get("accepted", 1))


def print_round_header() -> None:
    """The columns of `print_round` (the README's "The round table" explains them)."""
    typer.echo(
        "round  duration  devices  accuracy before -> after  train batch  max uplink  problems"
    )


def print_round(result: dict) -> None:
    devices = result["devices"]
    before = sum(d["acc_before"] for d in devices.values()) / max(len(devices), 1)
    after = sum(d["acc_after"] for d in devices.values()) / max(len(devices), 1)
    uplink = max((d["uplink_bytes"] for d in devices.values()), default=0)
    batch = sum(d["train_batch_ms"] for d in devices.values()) / max(len(devices), 1)
    problems = (
        ", ".join(
            [
                *(f"{n} refused" for n in result["refused"]),
                *(f"{n} missing" for n in result["missing"]),
                *(f"{n} kept its active model" for n, d in devices.items() if not kept_new(d)),
            ]
        )
        or "-"
    )
    svd = result.get("svd_relative_error")
    typer.echo(
        f"{result['round']:>5}  {result['duration_s']:>6.1f} s  {len(devices):>3} ok  "
        f"acc {before:6.2f} -> {after:6.2f} %  batch {batch:.4f} ms  up {uplink:>8.0f} B"
        + (f"  svd err {svd:.3f}" if svd is not None else "")
        + f"  {problems}"
    )
