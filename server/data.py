"""`fleet data`: turning public downloads into the files the loaders read, and checking a
user's own samples before a device trains on them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from skip2fleet.server import options as opt
from skip2fleet.shared import model as base_model
from skip2fleet.shared.datasets import samples
from skip2fleet.shared.datasets.hapt_import import import_hapt
from skip2fleet.shared.datasets.har import RAW_FILE


def import_hapt_command(
    raw_dir: Annotated[
        Path,
        typer.Argument(help="The HAPT download's RawData folder (acc_, gyro_, labels.txt)."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            callback=opt.writable_file,
            help="Output; --dataset har reads DATA_DIR/hapt/hapt_raw.npz.",
        ),
    ] = Path("data") / "hapt" / RAW_FILE,
) -> None:
    """Build hapt_raw.npz from UCI's HAPT raw signals (what --dataset har reads)."""
    held = import_hapt(raw_dir, out)
    typer.echo(
        f"wrote {out}: {held['rows']:,} rows of {held['experiments']} recordings of "
        f"{held['subjects']} subjects, {held['labelled_rows']:,} of them labelled"
    )


def check_command(
    path: Annotated[Path, typer.Argument(help="A .npz or .csv file, or a folder of them.")],
    base: Annotated[
        Path | None,
        typer.Option(help="A base model: labels must be its classes, samples its width."),
    ] = None,
    label_column: opt.LabelColumn = samples.DEFAULT_LABEL_COLUMN,
    holdout: Annotated[
        float, typer.Option(min=0.0, max=0.99, help="The task's hold-out fraction per class.")
    ] = samples.DEFAULT_HOLDOUT,
) -> None:
    """Check samples before a device trains on them: per class, shapes, values, labels."""
    model = base_model.load(base) if base is not None else None
    classes = base_model.classes_of(model) if model is not None else None
    width = base_model.spec_of(model).width if model is not None else None
    report = samples.check_samples(path, label_column, classes, width)
    shape = " x ".join(map(str, report.shape))
    files = f"{len(report.files)} file" + "s" * (len(report.files) != 1)
    typer.echo(f"{path}: {report.samples:,} samples in {files}, each {shape}")
    for name, count in report.files.items():
        typer.echo(f"  {name}: {count:,}")
    typer.echo(f"{'class':<20} {'samples':>10} {'train':>10} {'hold-out':>10}")
    for name, count in sorted(report.per_class.items()):
        held = samples.held_out_count(count, holdout)
        typer.echo(f"{name:<20} {count:>10,} {count - held:>10,} {held:>10,}")
    mean = report.total / max(report.samples * max(int(np.prod(report.shape)), 1), 1)
    typer.echo(
        f"values: min {report.low:.6g}, max {report.high:.6g}, mean {mean:.6g}; no NaN or Inf"
    )
    if model is not None:
        missing = [c for c in classes if c not in report.per_class]
        typer.echo(
            f"labels: all classes of the base {base_model.sha256(model)[:12]}"
            + (f"; none of {', '.join(missing)}" if missing else "")
        )
