"""`fleet model import` and `fleet model export`: thin wiring around `onnx_import` and
`onnx_export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skip2fleet.server import options as opt
from skip2fleet.shared import model as base_model
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.spec import describe


def _onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise FleetError(
            "ONNX support needs the onnx package: pip install 'skip2fleet[model]'"
        ) from None


def import_command(
    source: Annotated[Path, typer.Argument(help="The ONNX file (e.g. from torch.onnx.export).")],
    out: Annotated[
        Path,
        typer.Option(callback=opt.writable_file, help="Where to write the base model (.npz)."),
    ],
    classes: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated class names, one per output (default: the names the file "
            "carries, else 0, 1, ...)."
        ),
    ] = None,
) -> None:
    """Turn an ONNX classifier into a base model the fleet fine-tunes (no pretraining)."""
    _onnx()
    from skip2fleet.server.interchange.onnx_import import import_onnx

    names = [c.strip() for c in classes.split(",")] if classes else None
    model = import_onnx(source, names)
    digest = base_model.save(model, out)
    spec = base_model.spec_of(model)
    typer.echo(f"wrote {out} (sha256 {digest})")
    typer.echo(f"model: {describe(spec)}")
    typer.echo(
        f"classes: {', '.join(base_model.classes_of(model))}; {len(spec.taps())} skip taps; "
        f"a sample is {spec.width} values" + (" (channels last)" if spec.channels_last else "")
    )


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
    _onnx()
    from skip2fleet.server.interchange.onnx_export import export_onnx
    from skip2fleet.shared.predictor import Predictor

    if base is not None:
        model = base_model.load(base)
        predictor = Predictor(base_model.spec_of(model), model)
        classes = base_model.classes_of(model)
        what = f"base {base_model.sha256(model)[:12]}"
    else:
        from skip2fleet.client.model import load_device_model
        from skip2fleet.client.predict import existing_state_dir

        device = load_device_model(existing_state_dir(state_dir))
        predictor, classes = device.predictor, list(device.classes)
        version = device.active.version
        adapters = (
            f"{version.method} adapters of round {version.round} (version {version.number})"
            if version
            else "no adapters"
        )
        what = f"base {device.active.base_sha256[:12]} with {adapters}"
    size = export_onnx(predictor, out, list(classes))
    typer.echo(f"wrote {out} ({size:,} bytes): {what}")
    typer.echo(
        f"input 'input' of (batch, {', '.join(map(str, _rows(predictor)))}), output 'logits'"
    )


def _rows(predictor) -> tuple[int, ...]:
    spec = predictor.spec
    return spec.engine_input if spec.channels_last else tuple(spec.input)
