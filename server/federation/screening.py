"""A round's valid replies judged together (screen): what each device changed, block by block,
against the round's other replies.

A reply's change is its adapters minus what it started the round from (`starts`), cut into
blocks (`Layout.blocks`: each pair's A and B, i.e. each layer's LoRA and each tap's skip adapter,
and each plain array). A reply whose change in any block exceeds `federation.max_update_ratio`
times the round's median change in that block is refused, named with its worst block and ratio:
so a device that scaled only B, which the whole vector's norm (dominated by A's initial values)
hides, is caught. The median is the lower one, so a minority cannot move the yardstick, and of
two replies the smaller is it. A block whose median change is 0 says nothing.
"""

from __future__ import annotations

import numpy as np

from skip2fleet.server.federation.validation import Ledger
from skip2fleet.shared.layout import Layout


def screen(
    ledger: Ledger, starts: dict[str, np.ndarray], layouts: dict[str, Layout], max_ratio: float
) -> None:
    """Refuse the accepted replies whose change in some block is an outlier of the round."""
    norms: dict[str, dict[str, float]] = {}  # block -> device -> norm of its change
    for device, reply in ledger.accepted.items():
        if reply.adapters is None:
            continue
        change = reply.adapters - starts[device]
        for block, values in layouts[device].blocks(change).items():
            norms.setdefault(block, {})[device] = float(np.linalg.norm(values))
    worst: dict[str, tuple[float, str]] = {}  # device -> its largest ratio, and why
    for block, by_device in norms.items():
        for device, (ratio, why) in outliers(by_device, max_ratio).items():
            if ratio > worst.get(device, (0.0, ""))[0]:
                worst[device] = (ratio, f"{block}: {why}")
    for device, (_, why) in worst.items():
        ledger.refuse(device, why)


def outliers(norms: dict[str, float], max_ratio: float) -> dict[str, tuple[float, str]]:
    """The devices whose norm exceeds `max_ratio` times the lower median of `norms`, with the
    ratio and why."""
    if not norms:
        return {}
    median = sorted(norms.values())[(len(norms) - 1) // 2]
    if median <= 0:
        return {}
    return {
        device: (
            norm / median,
            f"change norm {norm:.3g} is {norm / median:.1f}x the round's median "
            f"{median:.3g} (at most {max_ratio:g}x)",
        )
        for device, norm in norms.items()
        if norm > max_ratio * median
    }
