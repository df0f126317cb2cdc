"""`fleet predict` and `fleet rollback` on a device: its active model at work, and choosing it.

Samples come from a file (`.npz` or `.csv`, as `fleet data check` reads them, labels optional)
or from standard input, one JSON array per line. Standard input is read as it arrives: the lines
already there are answered together (one forward pass for a pipe full of them), and a line that
comes alone is answered at once, so a sensor loop can pipe into it. Every answer says which
model gave it (base sha256, round).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, BinaryIO

import numpy as np
import typer

from skip2fleet.client.model import DeviceModel, load_device_model
from skip2fleet.client.store import DeviceStore
from skip2fleet.shared.datasets import samples
from skip2fleet.shared.errors import DataError

DEFAULT_STATE_DIR = Path("/opt/skip2fleet/state")  # install_dir/state of a deployed device


def existing_state_dir(path: Path) -> Path:
    """The state folder, which must exist: a wrong path is not "no active model yet"."""
    if not path.is_dir():
        problem = "not a folder" if path.exists() else "no such folder"
        raise DataError(f"--state-dir {path}: {problem}")
    return path


StateDir = Annotated[
    Path,
    typer.Option(help="The device's state folder (a deployed device: INSTALL_DIR/state)."),
]


Source = Annotated[
    str, typer.Argument(help="A .npz or .csv file of samples, or - for JSON lines on stdin.")
]
JsonLines = Annotated[
    bool,
    typer.Option(
        "--json",
        help="A JSON object per sample (label, class, probabilities by class, base_sha256, "
        "round) instead of text (a header line naming the columns, then a line per sample: "
        "label, class, each class's probability).",
    ),
]
LabelColumn = Annotated[
    str, typer.Option(help="A CSV's label column, left out of the features if present.")
]


def predict_command(
    source: Source = "-",
    state_dir: StateDir = DEFAULT_STATE_DIR,
    json_lines: JsonLines = False,
    label_column: LabelColumn = samples.DEFAULT_LABEL_COLUMN,
) -> None:
    """Classify samples with this device's active model (the base with its active adapters)."""
    model = load_device_model(existing_state_dir(state_dir))
    version = model.active.version
    said = f"round {version.round} (version {version.number})" if version else "the base alone"
    typer.echo(
        f"model: base {model.active.base_sha256[:12]}, adapters of {said}, hold-out accuracy "
        f"{model.active.accuracy:.2f} %",
        err=True,
    )
    if source == "-":
        rows = _stdin_rows(sys.stdin.buffer, model.width)
    else:
        rows = _file_rows(Path(source), label_column)
    out = sys.stdout
    if not json_lines:
        out.write("\t".join(("label", "class", *model.classes)) + "\n")
    for where, x in rows:
        try:
            probabilities = model.predict(x)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        out.write(_answers(model, probabilities, json_lines))
        if source == "-":
            out.flush()  # a sensor loop waits for each answer


def _file_rows(path: Path, label_column: str) -> Iterator[tuple[str, np.ndarray]]:
    for block in samples.read_blocks(path, label_column, labelled=False):
        yield block.where(0), block.x


def _stdin_rows(stream: BinaryIO, width: int) -> Iterator[tuple[str, np.ndarray]]:
    """The complete lines that have arrived, as one block of samples at a time; a bad line ends
    the samples after the good lines before it are answered."""
    pending, number = b"", 0
    while True:
        chunk = stream.read1(1 << 16)
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop() if chunk else b""
        rows, first, bad = [], number + 1, None
        for line in lines:
            number += 1
            try:
                if line.strip():
                    rows.append(_parse_line(line, f"stdin: line {number}", width))
            except DataError as exc:
                bad = exc
                break
        if rows:
            yield f"stdin: line {first}", np.vstack(rows)
        if bad is not None:
            raise bad
        if not chunk:
            return


def _parse_line(line: bytes, where: str, width: int) -> np.ndarray:
    """One JSON array of numbers; numbers are parsed by NumPy, a JSON parser costs more than
    the prediction."""
    text = line.strip()
    if not (text.startswith(b"[") and text.endswith(b"]")):
        raise DataError(f"{where}: not a JSON array of numbers")
    body = text[1:-1].decode("ascii", "replace")
    try:
        x = np.array(body.split(","), dtype=np.float32) if body.strip() else np.zeros(0)
    except ValueError:
        raise DataError(f"{where}: not a JSON array of numbers") from None
    if len(x) != width:
        raise DataError(f"{where}: a sample has {len(x)} values; the model takes {width}")
    if not np.isfinite(x).all():
        raise DataError(f"{where}: NaN or Inf")
    return x


def _answers(model: DeviceModel, probabilities: np.ndarray, json_lines: bool) -> str:
    labels = probabilities.argmax(axis=1)
    if json_lines:
        base, round_ = model.active.base_sha256, model.round
        return "".join(
            json.dumps(
                {
                    "label": int(k),
                    "class": model.classes[k],
                    "probabilities": {
                        c: round(float(p), 6) for c, p in zip(model.classes, row, strict=True)
                    },
                    "base_sha256": base,
                    "round": round_,
                }
            )
            + "\n"
            for k, row in zip(labels, probabilities, strict=True)
        )
    return "".join(
        f"{k}\t{model.classes[k]}\t" + "\t".join(f"{p:.4f}" for p in row) + "\n"
        for k, row in zip(labels, probabilities, strict=True)
    )


def rollback_here(state_dir: Path, round_: int | None) -> str:
    """Make an earlier version of this device's adapters the active one; what to say."""
    version = DeviceStore(existing_state_dir(state_dir)).rollback(round_)
    return (
        f"active: adapters of round {version.round} (version {version.number}), hold-out "
        f"accuracy {version.accuracy:.2f} % when made"
    )
