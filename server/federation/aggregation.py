"""Merging what the devices trained, chosen in fleet.yaml (`federation.aggregation`).

- `none`: every device keeps its own adapters (personalisation; the default for drift that
  differs per device). Nothing is sent back.
- `fedavg`: the weighted mean of every array, A and B separately, as most federated-LoRA code
  does. Biased: mean(A) @ mean(B) is not mean(A @ B). One rank on every device.
- `svd`: the exact weighted mean of every adapter's product A @ B, re-factorised to each
  device's rank by truncated SVD (the idea of FlexLoRA and FLARE's HLoRA); arrays that are not
  part of a low-rank pair (biases, full weights) are averaged. The relative Frobenius error the
  truncation leaves is reported.
- `median`, `trimmed-mean`: as `svd`, with the coordinate-wise median, or the mean of what is
  left after cutting `federation.trim` of the values at each end of every coordinate, in place of
  the mean (Flower's FedMedian and FedTrimmedAvg arithmetic, over the products): robust to a
  minority of devices sending anything at all; unweighted.

Weights (`weights`) are the coordinator's: a reply's sample count (validated, `validation`) or
equal, and no reply weighs more than `max_weight` times the equal share. With `clip`, each
reply's change from the round's start is first clipped to that many times the round's median
change (`clipped`). Means stream over the replies (no N copies stacked, in the replies' dtype);
median and trimmed mean hold the N values of one part at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from skip2fleet.shared.layout import Layout, layout
from skip2fleet.shared.methods import Method
from skip2fleet.shared.spec import Spec


@dataclass(frozen=True)
class Update:
    """One device's reply: its trained flat vector, how many samples it trained on, its rank."""

    device: str
    theta: np.ndarray
    samples: int
    rank: int


@dataclass(frozen=True)
class Rule:
    """How the replies are weighed (`federation.weighting`, `max_weight`) and trimmed."""

    weighting: str = "samples"
    max_weight: float = 2.0
    trim: float = 0.2


@dataclass(frozen=True)
class Aggregate:
    per_device: dict[str, np.ndarray]  # what to send each device next round (empty: nothing)
    svd_relative_error: float | None = None


Strategy = Callable[[list[Update], Method, Spec, Rule], Aggregate]
Reduce = Callable[[Iterator[np.ndarray], np.ndarray, Rule], np.ndarray]


def weights(updates: list[Update], rule: Rule) -> np.ndarray:
    """Each reply's share: by samples or equal, then no share above `max_weight` / N (what a
    capped reply loses goes to the others, by their own weights)."""
    raw = np.array(
        [1.0 if rule.weighting == "equal" else float(u.samples) for u in updates], np.float64
    )
    cap = rule.max_weight / len(updates)
    capped = np.zeros(len(updates), bool)
    share = raw / raw.sum()
    while (over := (share > cap) & ~capped).any():
        capped |= over
        free = ~capped
        share[capped] = cap
        if free.any():
            share[free] = raw[free] / raw[free].sum() * (1.0 - cap * capped.sum())
    return share


def clipped(updates: list[Update], starts: dict[str, np.ndarray], multiple: float) -> list[Update]:
    """Each reply's change from its start scaled down to at most `multiple` times the round's
    (lower) median change norm."""
    norms = [float(np.linalg.norm(u.theta - starts[u.device])) for u in updates]
    limit = multiple * sorted(norms)[(len(norms) - 1) // 2]
    out = []
    for u, norm in zip(updates, norms, strict=True):
        if norm > limit > 0:
            start = starts[u.device]
            theta = (start + (u.theta - start) * (limit / norm)).astype(u.theta.dtype)
            u = Update(u.device, theta, u.samples, u.rank)
        out.append(u)
    return out


def keep_own(updates: list[Update], method: Method, spec: Spec, rule: Rule = Rule()) -> Aggregate:
    return Aggregate({})


def fedavg(updates: list[Update], method: Method, spec: Spec, rule: Rule = Rule()) -> Aggregate:
    mean = _mean((u.theta for u in updates), weights(updates, rule), rule)
    mean = mean.astype(np.float32, copy=False)
    return Aggregate({u.device: mean for u in updates})


def _mean(values: Iterator[np.ndarray], shares: np.ndarray, rule: Rule) -> np.ndarray:
    """The weighted sum, one value at a time, in the values' dtype."""
    total = None
    for share, value in zip(shares, values, strict=True):
        term = value * value.dtype.type(share)
        if total is None:
            total = term
        else:
            total += term
    return total


def _median(values: Iterator[np.ndarray], shares: np.ndarray, rule: Rule) -> np.ndarray:
    return np.median(np.stack(list(values)), axis=0)


def trimmed_mean(stack: np.ndarray, trim: float) -> np.ndarray:
    """The mean along axis 0 of what is left after cutting int(trim * N) values at each end."""
    n = len(stack)
    cut = int(trim * n)
    kept = np.partition(stack, (cut, n - cut - 1), axis=0)[cut : n - cut]
    return kept.mean(axis=0)


def _trimmed(values: Iterator[np.ndarray], shares: np.ndarray, rule: Rule) -> np.ndarray:
    return trimmed_mean(np.stack(list(values)), rule.trim)


def over_products(reduce: Reduce) -> Strategy:
    """A strategy that reduces every part (each pair's product, each plain array) across the
    replies with `reduce`, then re-factorises the products to each device's rank."""

    def strategy(
        updates: list[Update], method: Method, spec: Spec, rule: Rule = Rule()
    ) -> Aggregate:
        shares = weights(updates, rule)
        layouts = [layout(method, spec, u.rank) for u in updates]

        def values(name: str) -> Iterator[np.ndarray]:
            return (lay.part(u.theta, name) for lay, u in zip(layouts, updates, strict=True))

        parts = {name: reduce(values(name), shares, rule) for name in layouts[0].parts()}
        per_device, residual, total = {}, 0.0, 0.0
        for rank in sorted({u.rank for u in updates}):
            theta, errors = _factorised(parts, layout(method, spec, rank))
            for pair_residual, pair_total in errors:
                residual += pair_residual
                total += pair_total
            per_device.update({u.device: theta for u in updates if u.rank == rank})
        error = float(np.sqrt(residual / total)) if total > 0 else 0.0
        return Aggregate(per_device, error)

    return strategy


def _factorised(
    parts: dict[str, np.ndarray], target: Layout
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """A `theta` of `target`'s layout holding the plain arrays and each product re-factorised
    to its rank by truncated SVD; with each pair's squared residual and squared norm."""
    theta = np.zeros(target.size, np.float32)
    arrays = target.views(theta)
    for name in target.plain:
        arrays[name][...] = parts[name]
    errors = []
    for pair, name in zip(target.pairs, target.parts(), strict=False):
        product = parts[name]
        u, s, vt = np.linalg.svd(product, full_matrices=False)
        keep = min(target.rank, len(s))  # a d x C product has rank <= C; further columns stay 0
        root = np.sqrt(s[:keep])
        a, b = arrays[pair.a][pair.a_rows], arrays[pair.b][pair.b_rows]
        a[:, :keep] = u[:, :keep] * root
        b[:keep] = root[:, None] * vt[:keep]
        errors.append((float(np.sum((product - a @ b) ** 2)), float(np.sum(product**2))))
    return theta, errors


STRATEGIES: dict[str, Strategy] = {
    "none": keep_own,
    "fedavg": fedavg,
    "svd": over_products(_mean),
    "median": over_products(_median),
    "trimmed-mean": over_products(_trimmed),
}
