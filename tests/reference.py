"""The test oracle: a slow, obviously correct float64 forward pass of any spec, a sample at a
time, channels first, convolutions and pooling as explicit loops (micrograd's idea: every fast
path is checked against something too simple to be wrong)."""

from __future__ import annotations

import numpy as np

from skip2fleet.shared.network import BN_EPS
from skip2fleet.shared.spec import Spec


def reference_logits(
    spec: Spec, arrays: dict, x: np.ndarray, skips: list[tuple[int, np.ndarray]] = ()
) -> np.ndarray:
    """Logits of raw rows `x`; `skips` adds `tap @ matrix` per (tap, matrix), taps flattened
    channels last as the engine lays them out."""
    a = {name: np.asarray(v, np.float64) for name, v in arrays.items() if name != "spec"}
    return np.array([_one(spec, a, row, skips) for row in np.asarray(x, np.float64)])


def _of(array: np.ndarray) -> range:
    return range(len(array))


def _flat(h: np.ndarray) -> np.ndarray:
    return h.T.ravel() if h.ndim == 2 else h  # (C, L) -> position-major, channels last


def _one(spec: Spec, a: dict, row: np.ndarray, skips) -> np.ndarray:
    h = (row - a["in_mean"]) / a["in_std"]
    taps = [h.copy()]
    if len(spec.input) == 2:
        h = h.reshape(spec.input)
    k = -1
    for b, block in enumerate(spec.blocks):
        if b:
            taps.append(_flat(h))
        for layer in block:
            op = layer.op
            if op in ("linear", "conv1d", "depthwise"):
                k += 1
                W, bias = a[f"W{k}"], a[f"b{k}"]
            if op == "linear":
                h = np.array(
                    [bias[o] + sum(h[i] * W[i, o] for i in range(len(h))) for o in range(len(bias))]
                )
            elif op in ("conv1d", "depthwise"):
                kernel, (channels, length) = layer.kernel, h.shape
                pad = np.zeros((channels, length + kernel - 1))
                pad[:, kernel // 2 : kernel // 2 + length] = h
                if op == "conv1d":
                    h = np.array(
                        [
                            [
                                bias[o]
                                + sum(
                                    W[c * kernel + j, o] * pad[c, t + j]
                                    for c in range(channels)
                                    for j in range(kernel)
                                )
                                for t in range(length)
                            ]
                            for o in range(len(bias))
                        ]
                    )
                else:
                    h = np.array(
                        [
                            [
                                bias[c] + sum(W[j, c] * pad[c, t + j] for j in range(kernel))
                                for t in range(length)
                            ]
                            for c in range(channels)
                        ]
                    )
            elif op == "batchnorm":
                shape = (-1, 1) if h.ndim == 2 else (-1,)
                norm = (a[f"gamma{k}"] / np.sqrt(a[f"var{k}"] + BN_EPS)).reshape(shape)
                h = (h - a[f"mean{k}"].reshape(shape)) * norm + a[f"beta{k}"].reshape(shape)
            elif op == "relu":
                h = np.where(h > 0, h, 0.0)
            elif op == "maxpool":
                s = layer.kernel
                h = np.array(
                    [[max(ch[t * s : t * s + s]) for t in range(len(ch) // s)] for ch in h]
                )
            elif op == "gap":
                h = np.array([sum(ch) / len(ch) for ch in h])
            elif op == "flatten":
                h = _flat(h)
    for tap, matrix in skips:
        h = h + taps[tap] @ matrix
    return h
