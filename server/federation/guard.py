"""The aggregate checked before it is saved or sent: finite, and no further from the round's start
than the accepted replies' changes allow.

Bounds that hold for any correct merge, so a failure means the merge went wrong (an overflow, a
bug), never that the fleet learnt too much. fedavg mixes whole vectors: in each block (A, B, each
plain array, `Layout.blocks`) its change is a weighted mean of the replies' changes, at most the
root-sum-square of their norms. The product strategies mix each part (a pair's product A @ B, or
a plain array, `Layout.parts`) coordinate by coordinate, mean, median or trimmed mean: within the
same root-sum-square; truncating a product to rank r then at most doubles its distance from the
start, whose rank is r (Eckart-Young), so the bound there is twice it. Changes are measured from
each receiving device's start; devices sharing a start (and an aggregate) are checked once.
"""

from __future__ import annotations

import hashlib

import numpy as np

from skip2fleet.server.federation.aggregation import Update
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import Method
from skip2fleet.shared.spec import Spec

SLACK = 1 + 1e-4  # float32 rounding


def check_aggregate(
    per_device: dict[str, np.ndarray],
    contributions: list[Update],
    starts: dict[str, np.ndarray],
    ranks: dict[str, int],
    method: Method,
    spec: Spec,
    vectors: bool,
) -> str | None:
    """Why the aggregate `per_device` must not be used, or None when it is sound; `vectors`:
    it mixed whole vectors (fedavg), else parts."""
    checked: set[tuple[str, str]] = set()
    for device, theta in per_device.items():
        if not np.isfinite(theta).all():
            return f"the aggregate for {device} holds NaN or Inf"
        key = (_digest(theta), _digest(starts[device]))
        if key in checked:
            continue
        checked.add(key)
        why = _beyond_bound(
            theta, starts[device], contributions, method, spec, ranks[device], vectors
        )
        if why:
            return f"the aggregate for {device}: {why}"
    return None


def _beyond_bound(
    theta: np.ndarray,
    start: np.ndarray,
    contributions: list[Update],
    method: Method,
    spec: Spec,
    rank: int,
    vectors: bool,
) -> str | None:
    target = layout(method, spec, rank)

    def changes(values: np.ndarray, lay) -> dict[str, np.ndarray]:
        if vectors:
            return lay.blocks(values - start)
        return {name: lay.part(values, name) - target.part(start, name) for name in lay.parts()}

    squares: dict[str, float] = {}
    for u in contributions:
        for name, change in changes(u.theta, layout(method, spec, u.rank)).items():
            squares[name] = squares.get(name, 0.0) + float(np.sum(change.astype(np.float64) ** 2))
    factor = 1.0 if vectors else 2.0
    for name, change in changes(theta, target).items():
        norm, bound = float(np.linalg.norm(change)), factor * np.sqrt(squares[name]) * SLACK
        if norm > bound:
            return f"{name} changed by {norm:.3g}, beyond the replies' bound {bound:.3g}"
    return None


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()
