"""The test oracle: a slow, obviously correct float64 forward pass of any spec, a sample at a
time, channels first, convolutions and pooling as explicit loops (micrograd's idea: every fast
path is checked against something too simple to be wrong)."""

from __future__ import annotations

import itertools

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


def _flat(h: np.ndarray) -> np.ndarray:
    return np.moveaxis(h, 0, -1).ravel()  # (C, ...) -> position-major, channels last


def _one(spec: Spec, a: dict, row: np.ndarray, skips) -> np.ndarray:
    h = (row - a["in_mean"]) / a["in_std"]
    taps = [h.copy()]
    if len(spec.input) > 1 and spec.channels_last:
        h = np.moveaxis(h.reshape(*spec.input[1:], spec.input[0]), -1, 0)
    elif len(spec.input) > 1:
        h = h.reshape(spec.input)
    counter = [-1]
    for b, block in enumerate(spec.blocks):
        if b:
            taps.append(_flat(h))
        h = _run(block, h, a, counter)
    for tap, matrix in skips:
        h = h + taps[tap] @ matrix
    return h


def _run(layers, h: np.ndarray, a: dict, counter: list[int]) -> np.ndarray:
    for layer in layers:
        op = layer.op
        if op in ("linear", "conv1d", "depthwise", "conv2d"):
            counter[0] += 1
            k = counter[0]
            W, bias = a[f"W{k}"], a[f"b{k}"]
        if op == "linear":
            h = np.array(
                [bias[o] + sum(h[i] * W[i, o] for i in range(len(h))) for o in range(len(bias))]
            )
        elif op in ("conv1d", "depthwise"):
            h = _conv1d(h, W, bias, layer.kernel, op == "depthwise")
        elif op == "conv2d":
            h = _conv2d(h, W, bias, layer)
        elif op == "batchnorm":
            shape = (-1,) + (1,) * (h.ndim - 1)
            norm = (a[f"gamma{k}"] / np.sqrt(a[f"var{k}"] + BN_EPS)).reshape(shape)
            h = (h - a[f"mean{k}"].reshape(shape)) * norm + a[f"beta{k}"].reshape(shape)
        elif op == "relu":
            h = np.where(h > 0, h, 0.0)
        elif op == "relu6":
            h = np.where(h > 6, 6.0, np.where(h > 0, h, 0.0))
        elif op == "maxpool":
            s = layer.kernel
            h = np.array([[max(ch[t * s : t * s + s]) for t in range(len(ch) // s)] for ch in h])
        elif op in ("maxpool2d", "avgpool2d"):
            h = _pool2d(h, layer)
        elif op == "gap":
            h = np.array([sum(ch.ravel()) / ch.size for ch in h])
        elif op == "flatten":
            h = _flat(h) if h.ndim > 1 else h
        elif op == "residual":
            branch = _run(layer.branch, h, a, counter)
            h = branch + _run(layer.shortcut, h, a, counter)
    return h


def _conv1d(h, W, bias, kernel: int, depthwise: bool) -> np.ndarray:
    channels, length = h.shape
    pad = np.zeros((channels, length + kernel - 1))
    pad[:, kernel // 2 : kernel // 2 + length] = h
    if depthwise:
        return np.array(
            [
                [
                    bias[c] + sum(W[j, c] * pad[c, t + j] for j in range(kernel))
                    for t in range(length)
                ]
                for c in range(channels)
            ]
        )
    return np.array(
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


def _padded(h: np.ndarray, pads, value: float) -> np.ndarray:
    top, left, bottom, right = pads
    channels, height, width = h.shape
    out = np.full((channels, height + top + bottom, width + left + right), value)
    out[:, top : top + height, left : left + width] = h
    return out


def _outputs(padded: np.ndarray, layer):
    (kh, kw), (sh, sw) = layer.window, layer.stride
    rows = (padded.shape[1] - kh) // sh + 1
    cols = (padded.shape[2] - kw) // sw + 1
    return itertools.product(range(rows), range(cols)), (rows, cols)


def _conv2d(h, W, bias, layer) -> np.ndarray:
    (kh, kw), (sh, sw) = layer.window, layer.stride
    padded = _padded(h, layer.pads, 0.0)
    per_group = h.shape[0] // layer.groups
    outs_per_group = len(bias) // layer.groups
    _, size = _outputs(padded, layer)
    out = np.zeros((len(bias), *size))
    for o in range(len(bias)):
        first = (o // outs_per_group) * per_group
        for y, x in _outputs(padded, layer)[0]:
            out[o, y, x] = bias[o] + sum(
                W[c * kh * kw + i * kw + j, o] * padded[first + c, y * sh + i, x * sw + j]
                for c in range(per_group)
                for i in range(kh)
                for j in range(kw)
            )
    return out


def _pool2d(h, layer) -> np.ndarray:
    (kh, kw), (sh, sw) = layer.window, layer.stride
    take_max = layer.op == "maxpool2d"
    padded = _padded(h, layer.pads, -np.inf)
    positions, size = _outputs(padded, layer)
    out = np.zeros((h.shape[0], *size))
    for y, x in positions:
        for c in range(h.shape[0]):
            window = [padded[c, y * sh + i, x * sw + j] for i in range(kh) for j in range(kw)]
            out[c, y, x] = max(window) if take_max else sum(window) / len(window)
    return out
