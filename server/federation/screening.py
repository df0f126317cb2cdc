"""A round's valid replies judged together (screen): outliers against the round's own median.

Adapters whose norm exceeds `federation.max_update_ratio` times the round's median norm are
refused, so that one device that scaled its update (a bug, or on purpose) cannot dominate the
merge. The median is the lower one: of two replies the smaller is the yardstick, so one wild
reply of two is caught. `outliers` sees only names and norms, so other screens (per block of the
adapters, say) can sit beside it.
"""

from __future__ import annotations

import numpy as np

from skip2fleet.server.federation.validation import Ledger


def screen(ledger: Ledger, max_ratio: float) -> None:
    """Refuse the accepted replies whose adapters are outliers of the round."""
    norms = {device: float(np.linalg.norm(r.adapters)) for device, r in ledger.accepted.items()}
    for device, why in outliers(norms, max_ratio).items():
        ledger.refuse(device, why)


def outliers(norms: dict[str, float], max_ratio: float) -> dict[str, str]:
    """The devices whose norm exceeds `max_ratio` times the lower median of `norms`, with why."""
    if not norms:
        return {}
    median = sorted(norms.values())[(len(norms) - 1) // 2]
    if median <= 0:
        return {}
    return {
        device: (
            f"adapter norm {norm:.3g} is {norm / median:.0f}x the round's median "
            f"{median:.3g} (at most {max_ratio:g}x)"
        )
        for device, norm in norms.items()
        if norm > max_ratio * median
    }
