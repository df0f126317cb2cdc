"""Charts as PNG files: matplotlib only when a chart is drawn, written atomically."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from skip2fleet.shared.atomic import write_atomic
from skip2fleet.shared.errors import FleetError

Chart = Callable[[Path], None]  # draws itself into the given PNG path


def pyplot():
    """matplotlib's pyplot on the Agg backend, or a clear error when the plot extra is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FleetError("charts need matplotlib: pip install 'skip2fleet[plot]'") from None
    return plt


def save_chart(fig, path: Path) -> None:
    """Write the figure as a PNG, whole or not at all, and free it."""
    fig.tight_layout()
    write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    pyplot().close(fig)
