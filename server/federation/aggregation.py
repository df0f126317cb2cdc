"""Merging what the devices trained, chosen in fleet.yaml (`federation.aggregation`).

- `none`: every device keeps its own adapters (personalisation; the default for drift that
  differs per device). Nothing is sent back.
- `fedavg`: the sample-weighted mean of every array, A and B separately, as most federated-LoRA
  code does. Biased: mean(A) @ mean(B) is not mean(A @ B).
- `svd`: the exact sample-weighted mean of every adapter's product A @ B, re-factorised to each
  device's rank by truncated SVD (the idea of FlexLoRA and FLARE's HLoRA); arrays that are not
  part of a low-rank pair (biases, full weights) are averaged. The relative Frobenius error the
  truncation leaves is reported.
"""

from __future__ import annotations

from collections.abc import Callable
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
class Aggregate:
    per_device: dict[str, np.ndarray]  # what to send each device next round (empty: nothing)
    svd_relative_error: float | None = None


Strategy = Callable[[list[Update], Method, Spec], Aggregate]


def _weights(updates: list[Update]) -> np.ndarray:
    samples = np.array([u.samples for u in updates], dtype=np.float64)
    return samples / samples.sum()


def keep_own(updates: list[Update], method: Method, spec: Spec) -> Aggregate:
    return Aggregate({})


def fedavg(updates: list[Update], method: Method, spec: Spec) -> Aggregate:
    mean = np.tensordot(_weights(updates), np.stack([u.theta for u in updates]), axes=1)
    mean = mean.astype(np.float32)
    return Aggregate({u.device: mean for u in updates})


def svd(updates: list[Update], method: Method, spec: Spec) -> Aggregate:
    products, plain = _mean_products(updates, method, spec)
    per_device, residual, total = {}, 0.0, 0.0
    for rank in sorted({u.rank for u in updates}):
        theta, errors = _factorised(products, plain, layout(method, spec, rank))
        for pair_residual, pair_total in errors:
            residual += pair_residual
            total += pair_total
        per_device.update({u.device: theta for u in updates if u.rank == rank})
    error = float(np.sqrt(residual / total)) if total > 0 else 0.0
    return Aggregate(per_device, error)


def _mean_products(
    updates: list[Update], method: Method, spec: Spec
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """The sample-weighted mean of every low-rank pair's product A @ B (pair i of each device's
    layout), and of every array outside a pair, by name."""
    weights = _weights(updates)
    views = [layout(method, spec, u.rank).views(u.theta) for u in updates]
    layouts = [layout(method, spec, u.rank).pairs for u in updates]
    products, paired = [], set()
    for pairs in zip(*layouts, strict=True):
        paired |= {pairs[0].a, pairs[0].b}
        products.append(
            sum(
                w * (v[p.a][p.a_rows] @ v[p.b][p.b_rows])
                for w, v, p in zip(weights, views, pairs, strict=True)
            )
        )
    plain = {
        name: sum(w * v[name] for w, v in zip(weights, views, strict=True))
        for name in views[0]
        if name not in paired
    }
    return products, plain


def _factorised(
    products: list[np.ndarray], plain: dict[str, np.ndarray], target: Layout
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """A `theta` of `target`'s layout holding the plain arrays and each product re-factorised
    to its rank by truncated SVD; with each pair's squared residual and squared norm."""
    theta = np.zeros(target.size, np.float32)
    arrays = target.views(theta)
    for name, value in plain.items():
        arrays[name][...] = value
    errors = []
    for pair, product in zip(target.pairs, products, strict=True):
        u, s, vt = np.linalg.svd(product, full_matrices=False)
        keep = min(target.rank, len(s))  # a d x C product has rank <= C; further columns stay 0
        root = np.sqrt(s[:keep])
        a, b = arrays[pair.a][pair.a_rows], arrays[pair.b][pair.b_rows]
        a[:, :keep] = u[:, :keep] * root
        b[:keep] = root[:, None] * vt[:keep]
        errors.append((float(np.sum((product - a @ b) ** 2)), float(np.sum(product**2))))
    return theta, errors


STRATEGIES: dict[str, Strategy] = {"none": keep_own, "fedavg": fedavg, "svd": svd}
