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

from skip2fleet.shared.engine import adapter_pairs, trainable_shapes, unflatten
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
    weights = _weights(updates)
    views = [unflatten(u.theta, trainable_shapes(method, spec, u.rank)) for u in updates]
    layouts = [adapter_pairs(method, spec, u.rank) for u in updates]  # pair i of every device
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
    per_device, residual, total = {}, 0.0, 0.0
    for rank in sorted({u.rank for u in updates}):
        shapes = trainable_shapes(method, spec, rank)
        theta = np.zeros(sum(int(np.prod(s)) for s in shapes.values()), np.float32)
        arrays = unflatten(theta, shapes)
        for name, value in plain.items():
            arrays[name][...] = value
        for pair, product in zip(adapter_pairs(method, spec, rank), products, strict=True):
            u, s, vt = np.linalg.svd(product, full_matrices=False)
            keep = min(rank, len(s))  # a d x C product has rank <= C; further columns stay 0
            root = np.sqrt(s[:keep])
            a, b = arrays[pair.a][pair.a_rows], arrays[pair.b][pair.b_rows]
            a[:, :keep] = u[:, :keep] * root
            b[:keep] = root[:, None] * vt[:keep]
            approx = a @ b
            residual += float(np.sum((product - approx) ** 2))
            total += float(np.sum(product**2))
        for update in updates:
            if update.rank == rank:
                per_device[update.device] = theta
    error = float(np.sqrt(residual / total)) if total > 0 else 0.0
    return Aggregate(per_device, error)


STRATEGIES: dict[str, Strategy] = {"none": keep_own, "fedavg": fedavg, "svd": svd}
