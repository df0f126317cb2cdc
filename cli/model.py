"""`fleet model`: ONNX in and out. The one coordinator command that reads a device's state
folder (its active model, to export it), so it is wired here, where both sides may meet:
`server/interchange` writes the graph, `client/model.py` loads what the device predicts with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skip2fleet.server import options as opt
from skip2fleet.server.interchange.commands import base_predictor, export, import_command
from skip2fleet.shared.errors import FleetError

app = typer.Typer(no_args_is_help=True, help="Bring your own network: ONNX in and out.")
app.command("import")(import_command)


@app.command("export")
def export_command(
    out: Annotated[
        Path, typer.Option(callback=opt.writable_file, help="Where to write the ONNX file.")
    ],
    state_dir: Annotated[
        Path | None,
        typer.Option(help="A device's state folder: its active model (base and adapters, merged)."),
    ] = None,
    base: Annotated[Path | None, typer.Option(help="A base model file alone.")] = None,
) -> None:
    """Write a device's active model (or a base) as ONNX, for onnxruntime or any runtime."""
    if (state_dir is None) == (base is None):
        raise FleetError("give one of --state-dir (a device's active model) or --base")
    if base is not None:
        predictor, classes, what = base_predictor(base)
        export(predictor, classes, out, what)
        return
    from skip2fleet.client.model import load_device_model
    from skip2fleet.client.predict import existing_state_dir

    device = load_device_model(existing_state_dir(state_dir))
    version = device.active.version
    adapters = (
        f"{version.method} adapters of round {version.round} (version {version.number})"
        if version
        else "no adapters"
    )
    what = f"base {device.active.base_sha256[:12]} with {adapters}"
    export(device.predictor, list(device.classes), out, what)
