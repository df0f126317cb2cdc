"""`fleet data`: turning public downloads into the files the loaders read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skip2fleet.shared.datasets.hapt_import import import_hapt
from skip2fleet.shared.datasets.har import RAW_FILE


def import_hapt_command(
    raw_dir: Annotated[
        Path,
        typer.Argument(help="The HAPT download's RawData folder (acc_, gyro_, labels.txt)."),
    ],
    out: Annotated[
        Path,
        typer.Option(help="Output; --dataset har reads DATA_DIR/hapt/hapt_raw.npz."),
    ] = Path("data") / "hapt" / RAW_FILE,
) -> None:
    """Build hapt_raw.npz from UCI's HAPT raw signals (what --dataset har reads)."""
    held = import_hapt(raw_dir, out)
    typer.echo(
        f"wrote {out}: {held['rows']:,} rows of {held['experiments']} recordings of "
        f"{held['subjects']} subjects, {held['labelled_rows']:,} of them labelled"
    )
