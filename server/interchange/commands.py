"""`fleet model import`, and what `fleet model export` does once it has a model: thin wiring
around `onnx_import` and `onnx_export` (the export command itself is `cli/model.py`'s, because
reading a device's state folder is the device's code)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skip2fleet.server import options as opt
from skip2fleet.shared import model as base_model
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.predictor import Predictor
from skip2fleet.shared.spec import describe


def require_onnx() -> None:
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
    require_onnx()
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


def base_predictor(base: Path) -> tuple[Predictor, list[str], str]:
    """A base model file alone: its predictor, classes and a description."""
    model = base_model.load(base)
    predictor = Predictor(base_model.spec_of(model), model)
    return predictor, list(base_model.classes_of(model)), f"base {base_model.sha256(model)[:12]}"


def export(predictor: Predictor, classes: list[str], out: Path, what: str) -> None:
    """Write `predictor` to `out` as ONNX and say what was written."""
    require_onnx()
    from skip2fleet.server.interchange.onnx_export import export_onnx

    size = export_onnx(predictor, out, classes)
    spec = predictor.spec
    rows = spec.engine_input if spec.channels_last else tuple(spec.input)
    typer.echo(f"wrote {out} ({size:,} bytes): {what}")
    typer.echo(f"input 'input' of (batch, {', '.join(map(str, rows))}), output 'logits'")
