"""What a federated run shows: a row per round as it completes, and the run's summary.

A device's "after" is its active model's accuracy on its hold-out: this round's adapters when it
made them active, else the model it kept (marked `kept`, with what the refused adapters scored).
Every problem of a round (a refused device and why, a missing one and why, a kept model, nodes
that could not be named) is said under the round's row and in the report's problems section.
"""

from __future__ import annotations

from pathlib import Path

import typer

from skip2fleet.server.charts import Chart, legend_beside, log_scale, pyplot, save_chart

SHOWN = 10  # problems a round's row names in the terminal (a fleet of 1,000 may have hundreds)


def kept_new(figures: dict) -> bool:
    """Whether the device made this round's adapters active (older run folders: yes)."""
    return bool(figures.get("accepted", 1))


def active_accuracy(figures: dict) -> float:
    """The device's active model on its hold-out after the round, percent."""
    return figures["acc_after"] if kept_new(figures) else figures.get("acc_active", 0.0)


def problems(result: dict) -> list[str]:
    """Every problem of a round, one line each: who and what, a colon, and why."""
    lines = [f"{name} refused: {why}" for name, why in result["refused"].items()]
    why_missing = result.get("missing_why", {})
    lines += [f"{name} missing: {why_missing.get(name, 'no reply')}" for name in result["missing"]]
    lines += [
        f"{name} kept its active model: {d.get('acc_active', 0.0):.2f} % on its hold-out, "
        f"this round's adapters {d['acc_after']:.2f} %"
        for name, d in result["devices"].items()
        if not kept_new(d)
    ]
    unnamed = result.get("unnamed_nodes", {})
    lines += [f"{count} unnamed node(s): {why}" for why, count in unnamed.items()]
    return lines


def federated_report(summary: dict, shown: int | None = None) -> tuple[str, Chart]:
    """Per device: accuracy before and after (last round); per round: time, bytes, problems.
    With `shown` (the terminal's copy), at most that many devices and problems are listed: the
    devices with the lowest accuracy after, then how many more and where they all are."""
    rounds = summary["rounds"]
    ratio = summary["full_model_bytes"] / summary["adapter_bytes"]
    lines = [
        f"### Federated fine-tuning, {summary['dataset']}: {summary['devices']} devices, "
        f"{len(rounds)} rounds, {summary['method']}, aggregation {summary['aggregation']}",
        "",
        f"Full model {summary['full_model_bytes']} bytes; packed adapters "
        f"{summary['adapter_bytes']} bytes (1/{ratio:.1f} of the model). "
        f"Wall {summary['wall_s']:.1f} s.",
        "",
        *_device_table(rounds[-1]["devices"], shown),
        "",
        *_round_table(rounds),
    ]
    said = [f"- round {r['round']}: {line}" for r in rounds for line in problems(r)]
    if said:
        lines += ["", "Problems:", "", *said[:shown]]
        if shown is not None and len(said) > shown:
            lines.append(f"- ... {len(said) - shown} more in the run's report.md")
    return "\n".join(lines) + "\n", lambda path: _chart(summary, path)


def _device_table(last: dict, shown: int | None = None) -> list[str]:
    lines = [
        "| device | accuracy before % | after % (active model) | active | train batch ms "
        "| uplink bytes |",
        "|---|---:|---:|---|---:|---:|",
    ]
    listed = list(last)
    if shown is not None and len(listed) > shown:
        listed = sorted(listed, key=lambda name: active_accuracy(last[name]))[:shown]
    for name in listed:
        d = last[name]
        active = "new" if kept_new(d) else f"kept (this round's {d['acc_after']:.2f} %)"
        lines.append(
            f"| {name} | {d['acc_before']:.2f} | {active_accuracy(d):.2f} | {active} "
            f"| {d['train_batch_ms']:.4f} | {d['uplink_bytes']:.0f} |"
        )
    if len(listed) < len(last):
        after = sorted(active_accuracy(d) for d in last.values())
        lines.append(
            f"| ... {len(last) - len(listed)} more (the {len(listed)} lowest are above; median "
            f"after {after[len(after) // 2]:.2f} %, best {after[-1]:.2f} %): all in report.md "
            "| | | | | |"
        )
    return lines


def _round_table(rounds: list[dict]) -> list[str]:
    lines = [
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
    return lines


def _chart(summary: dict, path: Path) -> None:
    rounds = summary["rounds"]
    fig, (acc, dur, up) = pyplot().subplots(1, 3, figsize=(13, 4))
    _accuracy_panel(acc, rounds[-1])
    numbers = [r["round"] for r in rounds]
    dur.bar(numbers, [r["duration_s"] for r in rounds], color="#55a868")
    dur.set_ylabel("seconds")
    dur.set_title("time per round")
    _bytes_panel(up, rounds, summary["full_model_bytes"])
    for axis in (dur, up):
        axis.set_xticks(numbers)
        axis.set_xlabel("round")
    save_chart(fig, path)


def _accuracy_panel(ax, last_round: dict) -> None:
    last = last_round["devices"]
    names = list(last)
    xs = range(len(names))
    before = [last[n]["acc_before"] for n in names]
    after = [active_accuracy(last[n]) for n in names]
    ax.bar([x - 0.2 for x in xs], before, 0.4, color="#c44e52", label="before")
    ax.bar([x + 0.2 for x in xs], after, 0.4, color="#4c72b0", label="after (active model)")
    ax.set_xticks(list(xs), names, rotation=45)
    ax.set_ylabel("test accuracy % (own data)")
    ax.set_title(f"per device, after round {last_round['round']}")
    legend_beside(ax)


def _bytes_panel(ax, rounds: list[dict], full_model_bytes: int) -> None:
    numbers = [r["round"] for r in rounds]
    down = [sum(r["downlink_bytes"].values()) for r in rounds]
    sent = [sum(d["uplink_bytes"] for d in r["devices"].values()) for r in rounds]
    ax.bar([n - 0.2 for n in numbers], down, 0.4, color="#937860", label="to devices")
    ax.bar([n + 0.2 for n in numbers], sent, 0.4, color="#8172b3", label="from devices")
    ax.axhline(full_model_bytes, color="black", linestyle="--", label="one full model")
    log_scale(ax, [*down, *sent, full_model_bytes])
    ax.set_ylabel("bytes, all devices")
    ax.set_title("bytes per round")
    legend_beside(ax)


def print_round_header() -> None:
    """The columns of `print_round` (the README's "The round table" explains them)."""
    typer.echo(
        "round  duration  devices  accuracy before -> after  train batch  max uplink  problems"
    )


def print_round(result: dict) -> None:
    """The round's row (its problems named in the last column), then each problem with why on
    a line of its own."""
    devices = result["devices"]
    count = max(len(devices), 1)
    before = sum(d["acc_before"] for d in devices.values()) / count
    after = sum(active_accuracy(d) for d in devices.values()) / count
    uplink = max((d["uplink_bytes"] for d in devices.values()), default=0)
    batch = sum(d["train_batch_ms"] for d in devices.values()) / count
    said = problems(result)
    svd = result.get("svd_relative_error")
    typer.echo(
        f"{result['round']:>5}  {result['duration_s']:>6.1f} s  {len(devices):>3} ok  "
        f"acc {before:6.2f} -> {after:6.2f} %  batch {batch:.4f} ms  up {uplink:>8.0f} B"
        + (f"  svd err {svd:.3f}" if svd is not None else "")
        + f"  {', '.join(line.split(':', 1)[0] for line in said[:SHOWN]) or '-'}"
        + (f" and {len(said) - SHOWN} more" if len(said) > SHOWN else "")
    )
    for line in said[:SHOWN]:
        typer.echo(f"       {line}")
    if len(said) > SHOWN:
        typer.echo(
            f"       ... {len(said) - SHOWN} more: all in the run's report.md and round.json"
        )
