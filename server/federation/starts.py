"""What each device starts a round from, as the coordinator knows it (screening and the aggregate
check measure a reply's change from it).

A fleet that aggregates sends every device the adapters to start from, from round 1 on: one fresh
initialisation per rank, drawn from `training.seed` as a device draws its own, so that the
devices' first changes are measured from, and averaged over, one common start. Without
aggregation a device draws its own (seed + its index) and continues from its own; the coordinator
measures its change from that fresh start, i.e. all it has learnt so far.
"""

from __future__ import annotations

import numpy as np

from skip2fleet.shared.engine import FineTuner
from skip2fleet.shared.methods import Method
from skip2fleet.shared.model import Model


def initial_adapters(base: Model, method: Method, rank: int, seed: int) -> np.ndarray:
    """The adapters a device's fine-tune starts from when it is given none."""
    return FineTuner(base, method, rank=rank, batch_size=1, seed=seed).theta.copy()


def fresh_starts(
    base: Model, method: Method, ranks: dict[str, int], seed: int, shared: bool
) -> dict[str, np.ndarray]:
    """Each device's fresh start: one per rank at `seed` when `shared`, else its own (seed plus
    its index in the fleet, `client.clientapp.train_adapters`)."""
    if shared:
        per_rank = {r: initial_adapters(base, method, r, seed) for r in set(ranks.values())}
        return {device: per_rank[rank] for device, rank in ranks.items()}
    return {
        device: initial_adapters(base, method, rank, seed + index)
        for index, (device, rank) in enumerate(ranks.items())
    }
