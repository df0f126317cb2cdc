"""Pretraining the base network on the source domain, batch norm on batch statistics.

This is the coordinator's job, done once; it is not on any device's hot path, so it is written
for clarity: a plain forward/backward over the dict of arrays, checked against finite differences
in the tests, and Adam. Batch norm's running statistics (momentum 0.1, unbiased variance, as in
PyTorch) become the frozen statistics every device fine-tunes with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from skip2fleet.shared.model import BN_EPS, Model, init_model

TRAINED = ("W0", "b0", "gamma0", "beta0", "W1", "b1", "gamma1", "beta1", "W2", "b2")
BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0


def loss_and_grads(
    model: Model, x0: np.ndarray, y: np.ndarray
) -> tuple[float, dict[str, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Mean cross-entropy on standardised inputs `x0` with batch statistics; returns the loss,
    its gradient for every trained array, and each batch norm's (mean, unbiased variance)."""
    h, saved, stats = x0, [], []
    for k in (0, 1):
        pre = h @ model[f"W{k}"] + model[f"b{k}"]
        mean, var = pre.mean(axis=0), pre.var(axis=0)
        inv_std = 1.0 / np.sqrt(var + BN_EPS)
        normed = (pre - mean) * inv_std
        out = np.maximum(model[f"gamma{k}"] * normed + model[f"beta{k}"], 0)
        saved.append((h, normed, inv_std, out))
        stats.append((mean, pre.var(axis=0, ddof=1) if len(pre) > 1 else var))
        h = out
    z = h @ model["W2"] + model["b2"]
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.mean(np.log(p[np.arange(n), y] + 1e-30)))
    dz = p
    dz[np.arange(n), y] -= 1
    dz /= n
    grads = {"W2": h.T @ dz, "b2": dz.sum(axis=0)}
    delta = dz @ model["W2"].T
    for k in (1, 0):
        inp, normed, inv_std, out = saved[k]
        da = delta * (out > 0)
        grads[f"gamma{k}"] = (da * normed).sum(axis=0)
        grads[f"beta{k}"] = da.sum(axis=0)
        dn = da * model[f"gamma{k}"]
        dpre = inv_std / n * (n * dn - dn.sum(axis=0) - normed * (dn * normed).sum(axis=0))
        grads[f"W{k}"] = inp.T @ dpre
        grads[f"b{k}"] = dpre.sum(axis=0)
        if k:
            delta = dpre @ model[f"W{k}"].T
    return loss, grads, stats


def pretrain(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    config: PretrainConfig = PretrainConfig(),
    on_epoch: Callable[[int, float], None] | None = None,
) -> Model:
    """A base model trained on raw features `x` with labels `y` (Adam, shuffled mini-batches)."""
    rng = np.random.default_rng([config.seed, 0])
    model = {k: v.astype(np.float64) for k, v in init_model(x.shape[1], n_classes, rng).items()}
    model["in_mean"] = x.mean(axis=0)
    std = x.std(axis=0)
    model["in_std"] = np.where(std > 1e-8, std, 1.0)
    x0 = (x - model["in_mean"]) / model["in_std"]
    first = {k: np.zeros_like(model[k]) for k in TRAINED}
    second = {k: np.zeros_like(model[k]) for k in TRAINED}
    beta1, beta2, step = 0.9, 0.999, 0
    batch = min(config.batch_size, len(y))
    for epoch in range(config.epochs):
        order = rng.permutation(len(y))
        total = 0.0
        for start in range(0, len(y) - batch + 1, batch):
            idx = order[start : start + batch]
            loss, grads, stats = loss_and_grads(model, x0[idx], y[idx])
            total += loss
            step += 1
            for k in TRAINED:
                first[k] = beta1 * first[k] + (1 - beta1) * grads[k]
                second[k] = beta2 * second[k] + (1 - beta2) * grads[k] ** 2
                m_hat = first[k] / (1 - beta1**step)
                v_hat = second[k] / (1 - beta2**step)
                model[k] -= config.lr * m_hat / (np.sqrt(v_hat) + 1e-8)
            for k, (mean, var) in enumerate(stats):
                model[f"mean{k}"] += BN_MOMENTUM * (mean - model[f"mean{k}"])
                model[f"var{k}"] += BN_MOMENTUM * (var - model[f"var{k}"])
        if on_epoch is not None:
            on_epoch(epoch, total / max(1, len(y) // batch))
    return {k: v.astype(np.float32) for k, v in model.items()}
