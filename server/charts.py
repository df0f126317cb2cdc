"""Charts as PNG files: matplotlib only when a chart is drawn, written atomically."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
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


def legend_beside(ax) -> None:
    """The axes' legend to its right, where it covers no data (inside the axes, "lower right"
    hid the last device's bars and the slowest method's update time)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small")


def log_scale(ax, values: Iterable[float], axis: str = "y") -> None:
    """A log axis over whole decades around the positive `values`, at least one decade, so that at
    least two ticks are labelled (data within one decade showed one tick, or none)."""
    positive = [v for v in values if v > 0]
    low = math.floor(math.log10(min(positive)))
    high = max(math.ceil(math.log10(max(positive))), low + 1)
    getattr(ax, f"set_{axis}scale")("log")
    getattr(ax, f"set_{axis}lim")(10.0**low, 10.0**high)


def save_chart(fig, path: Path) -> None:
    """Write the figure as a PNG, legends beside the axes included, whole or not at all, and
    free it."""
    fig.tight_layout()
    write_atomic(
        path, lambda handle: fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    )
    pyplot().close(fig)
