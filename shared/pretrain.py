"""Pretraining the base network on the source domain, batch norm on batch statistics.

This is the coordinator's job, done once: the engine (`shared.engine`) runs the network with every
weight, bias and batch-norm scale and shift trainable and batch norm on batch statistics, in
float64, under Adam. Batch norm's running statistics (momentum 0.1, unbiased variance, as in
PyTorch) become the frozen statistics every device fine-tunes with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from skip2fleet.shared.engine import FineTuner
from skip2fleet.shared.methods import Method
from skip2fleet.shared.model import SPEC_KEY, Model, cross_entropy, init_model
from skip2fleet.shared.network import BatchNorm
from skip2fleet.shared.spec import Spec, mlp

BN_MOMENTUM = 0.1
PRETRAIN = Method("pretrain", "everything", weights="all", biases="all", batchnorm=True)


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0


def input_statistics(spec: Spec, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread of the raw inputs: per feature, or per channel over a window or image."""
    if len(spec.input) > 1:
        channels = spec.input[0]
        positions = spec.width // channels
        if spec.channels_last:
            per_channel = x.reshape(len(x), positions, channels)
            mean, std = per_channel.mean(axis=(0, 1)), per_channel.std(axis=(0, 1))
            mean, std = np.tile(mean, positions), np.tile(std, positions)
        else:
            per_channel = x.reshape(len(x), channels, positions)
            mean, std = per_channel.mean(axis=(0, 2)), per_channel.std(axis=(0, 2))
            mean, std = np.repeat(mean, positions), np.repeat(std, positions)
    else:
        mean, std = x.mean(axis=0), x.std(axis=0)
    return mean, np.where(std > 1e-8, std, 1.0)


def pretraining_tuner(model: Model, batch: int) -> FineTuner:
    """The engine set up to pretrain `model` (float64, batch statistics, everything trains)."""
    return FineTuner(model, PRETRAIN, batch_size=batch, dtype=np.float64, batch_stats=True)


def pretrain(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    config: PretrainConfig = PretrainConfig(),
    on_epoch: Callable[[int, float], None] | None = None,
    spec: Spec | None = None,
    on_model: Callable[[int, Model], None] | None = None,
) -> Model:
    """A base model of `spec` (default the paper's MLP) trained on raw samples `x` with labels
    `y` (Adam, shuffled mini-batches; the last incomplete batch of an epoch is dropped);
    `on_model` sees the model as it stands after every epoch (choosing the epochs)."""
    spec = spec or mlp(x.shape[1], n_classes)
    rng = np.random.default_rng([config.seed, 0])
    model = init_model(spec, rng)
    model["in_mean"], model["in_std"] = input_statistics(spec, x)
    batch = min(config.batch_size, len(y))
    tuner = pretraining_tuner(model, batch)
    tuner.attach(x, y)
    norms = [op for op in tuner.network.every_op() if isinstance(op, BatchNorm)]
    first, second = np.zeros_like(tuner.theta), np.zeros_like(tuner.theta)
    beta1, beta2, step = 0.9, 0.999, 0
    for epoch in range(config.epochs):
        order = rng.permutation(len(y))
        total = 0.0
        for start in range(0, len(y) - batch + 1, batch):
            idx = order[start : start + batch]
            tuner.forward(idx)
            total += cross_entropy(tuner.z, y[idx])
            tuner.backward()
            step += 1
            first += (1 - beta1) * (tuner.grad - first)
            second += (1 - beta2) * (tuner.grad**2 - second)
            m_hat = first / (1 - beta1**step)
            v_hat = second / (1 - beta2**step)
            tuner.theta -= config.lr * m_hat / (np.sqrt(v_hat) + 1e-8)
            for op in norms:
                mean, var = op.stats
                op.mean += BN_MOMENTUM * (mean - op.mean)
                op.var += BN_MOMENTUM * (var - op.var)
        if on_epoch is not None:
            on_epoch(epoch, total / max(1, len(y) // batch))
        if on_model is not None:
            on_model(epoch, _as_base(tuner))
    return _as_base(tuner)


def _as_base(tuner: FineTuner) -> Model:
    """The pretrained arrays as a float32 base model (copies)."""
    trained = {**tuner.model, **tuner.params}
    return {k: v if k == SPEC_KEY else v.astype(np.float32) for k, v in trained.items()}
