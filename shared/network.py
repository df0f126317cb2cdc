"""The one forward and backward pass of any spec (`shared.spec`), over named arrays.

Training, the Skip2 cache, merged inference and pretraining all run these ops, so the network is
written once. An op's `forward` keeps what its `backward` needs; `backward` writes the gradients of
the op's trainable arrays into the views it was given (slices of the engine's flat `grad`) and
returns the gradient at its input only when a lower op still needs one. Batch norm runs on frozen
running statistics (fine-tuning, inference) or on batch statistics (pretraining). Convolutions are
im2col plus one product, channels last; adapters beside a weighted layer see the same im2col rows.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from skip2fleet.shared import flops
from skip2fleet.shared.flops import INPUT_GRAD, WEIGHT_GRAD, matmul
from skip2fleet.shared.spec import Placed, Spec

BN_EPS = 1e-5
ROWS_PER_PASS = 256  # a whole data set goes through in passes of this many rows (bounds im2col)
Arrays = dict[str, np.ndarray]


class Adapter(Protocol):
    """What sits beside a weighted layer (`shared.peft`): it may reparametrise the weight the layer
    multiplies by, add its own term to the output, and turn the output gradient into its own."""

    needs_weight_grad: bool

    def weight(self, base: np.ndarray) -> np.ndarray: ...
    def add(self, cols: np.ndarray, out: np.ndarray) -> None: ...
    def backward(
        self, cols: np.ndarray, dout: np.ndarray, dweight: np.ndarray | None, need_dx: bool
    ) -> np.ndarray | None: ...


def _pad(x: np.ndarray, kernel: int) -> np.ndarray:
    pad = kernel // 2
    padded = np.zeros((x.shape[0], x.shape[1] + 2 * pad, x.shape[2]), x.dtype)
    padded[:, pad : pad + x.shape[1]] = x
    return padded


def im2col(x: np.ndarray, kernel: int) -> np.ndarray:
    """(N, L, C) -> (N*L, C*kernel): row (n, t) holds x[n, t - kernel//2 + j, c] at c*kernel + j."""
    n, length, channels = x.shape
    if kernel == 1:
        return x.reshape(n * length, channels)
    windows = np.lib.stride_tricks.sliding_window_view(_pad(x, kernel), kernel, axis=1)
    return windows.reshape(n * length, channels * kernel)


def col2im(dcols: np.ndarray, shape: tuple[int, ...], kernel: int) -> np.ndarray:
    """The gradient at x from the gradient at its im2col rows (the adjoint of `im2col`)."""
    n, length, channels = shape
    if kernel == 1:
        return dcols.reshape(shape)
    d = dcols.reshape(n, length, channels, kernel)
    pad = kernel // 2
    padded = np.zeros((n, length + 2 * pad, channels), dcols.dtype)
    for j in range(kernel):
        padded[:, j : j + length] += d[..., j]
    return padded[:, pad : pad + length]


class Dense:
    """Linear or conv1d: `out = cols(x) @ W + b`."""

    def __init__(self, p: Placed, arrays: Arrays, grads: Arrays, adapter: Adapter | None) -> None:
        self.kernel = p.layer.kernel if p.layer.op == "conv1d" else 0
        self.W, self.b = arrays[f"W{p.k}"], arrays[f"b{p.k}"]
        self.gW, self.gb = grads.get(f"W{p.k}"), grads.get(f"b{p.k}")
        self.adapter = adapter
        self.trains = self.gW is not None or self.gb is not None or adapter is not None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.shape = x.shape
        self.cols = im2col(x, self.kernel) if self.kernel else x
        self.weight = self.W if self.adapter is None else self.adapter.weight(self.W)
        out = matmul(self.cols, self.weight)
        out += self.b
        if self.adapter is not None:
            self.adapter.add(self.cols, out)
        return out.reshape(x.shape[0], x.shape[1], -1) if self.kernel else out

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        d = dy.reshape(-1, dy.shape[-1])
        dweight = None
        if self.gW is not None:
            dweight = matmul(self.cols.T, d, out=self.gW, kind=WEIGHT_GRAD)
        elif self.adapter is not None and self.adapter.needs_weight_grad:
            dweight = matmul(self.cols.T, d, kind=WEIGHT_GRAD)
        if self.gb is not None:
            np.add.reduce(d, axis=0, out=self.gb)
        adapter = self.adapter
        extra = None if adapter is None else adapter.backward(self.cols, d, dweight, need_dx)
        if not need_dx:
            return None
        dcols = matmul(d, self.weight.T, kind=INPUT_GRAD)
        if extra is not None:
            dcols += extra
        return col2im(dcols, self.shape, self.kernel) if self.kernel else dcols


class Depthwise:
    """One kernel per channel: `out[n, t, c] = sum_j W[j, c] x[n, t - k//2 + j, c] + b[c]`."""

    def __init__(self, p: Placed, arrays: Arrays, grads: Arrays, adapter: None) -> None:
        self.kernel = p.layer.kernel
        self.W, self.b = arrays[f"W{p.k}"], arrays[f"b{p.k}"]
        self.gW, self.gb = grads.get(f"W{p.k}"), grads.get(f"b{p.k}")
        self.trains = self.gW is not None or self.gb is not None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.padded, length = _pad(x, self.kernel), x.shape[1]
        out = self.padded[:, :length] * self.W[0]
        for j in range(1, self.kernel):
            out += self.padded[:, j : j + length] * self.W[j]
        out += self.b
        flops.add(2 * x.size * self.kernel)
        return out

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        length = dy.shape[1]
        if self.gW is not None:
            for j in range(self.kernel):
                self.gW[j] = np.einsum("ntc,ntc->c", dy, self.padded[:, j : j + length])
            flops.add(2 * dy.size * self.kernel, WEIGHT_GRAD)
        if self.gb is not None:
            self.gb[...] = dy.sum(axis=(0, 1))
        if not need_dx:
            return None
        padded = np.zeros_like(self.padded)
        for j in range(self.kernel):
            padded[:, j : j + length] += dy * self.W[j]
        flops.add(2 * dy.size * self.kernel, INPUT_GRAD)
        pad = self.kernel // 2
        return padded[:, pad : pad + length]


class BatchNorm:
    """Per channel (the last axis): frozen running statistics, or the batch's (pretraining)."""

    def __init__(self, p: Placed, arrays: Arrays, grads: Arrays, batch_stats: bool) -> None:
        k = p.k
        self.gamma, self.beta = arrays[f"gamma{k}"], arrays[f"beta{k}"]
        self.mean, self.var = arrays[f"mean{k}"], arrays[f"var{k}"]
        self.ggamma, self.gbeta = grads.get(f"gamma{k}"), grads.get(f"beta{k}")
        self.batch_stats = batch_stats
        self.trains = self.ggamma is not None
        self.inv = (1.0 / np.sqrt(self.var + BN_EPS)).astype(self.var.dtype)
        self.scale = self.gamma * self.inv
        self.shift = self.beta - self.mean * self.scale

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.axes = tuple(range(x.ndim - 1))
        if self.batch_stats:
            mean, var = x.mean(axis=self.axes), x.var(axis=self.axes)
            count = x.size // x.shape[-1]
            self.stats = (mean, var * count / (count - 1) if count > 1 else var)
            self.inv = 1.0 / np.sqrt(var + BN_EPS)
            self.xhat = (x - mean) * self.inv
        elif self.trains:
            self.xhat = (x - self.mean) * self.inv
        else:
            out = x * self.scale
            out += self.shift
            return out
        return self.xhat * self.gamma + self.beta

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        if self.trains:
            np.add.reduce(dy * self.xhat, axis=self.axes, out=self.ggamma)
            np.add.reduce(dy, axis=self.axes, out=self.gbeta)
        if not need_dx:
            return None
        if not self.batch_stats:
            return dy * (self.gamma * self.inv if self.trains else self.scale)
        dn = dy * self.gamma
        count = dy.size // dy.shape[-1]
        centred = dn.sum(axis=self.axes) + self.xhat * (dn * self.xhat).sum(axis=self.axes)
        return self.inv / count * (count * dn - centred)


class ReLU:
    trains = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.out = np.maximum(x, 0)
        return self.out

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray:
        return dy * (self.out > 0)


class MaxPool:
    """Non-overlapping windows of `size` along the length; a trailing remainder is dropped. The
    first of equal maxima takes the gradient. Written as a loop over the (small) window so that
    every call works on whole (N, length, channels) arrays: `argmax` over a middle axis of 2 was
    the slowest call of a CNN step."""

    trains = False

    def __init__(self, size: int) -> None:
        self.size = size

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.shape, out_len = x.shape, x.shape[1] // self.size
        windows = x[:, : out_len * self.size].reshape(x.shape[0], out_len, self.size, -1)
        best = windows[:, :, 0].copy()
        self.where = np.zeros(best.shape, np.int8)
        for j in range(1, self.size):  # (masked stores took 5-10x as long as these)
            better = windows[:, :, j] > best
            np.maximum(best, windows[:, :, j], out=best)
            self.where = np.where(better, np.int8(j), self.where)
        return best

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray:
        dx = np.zeros(self.shape, dy.dtype)
        windows = dx[:, : dy.shape[1] * self.size].reshape(*dy.shape[:2], self.size, -1)
        for j in range(self.size):
            np.multiply(dy, self.where == j, out=windows[:, :, j])
        return dx


class GlobalAvgPool:
    trains = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.shape = x.shape
        return x.mean(axis=1)

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray:
        return np.broadcast_to(dy[:, None, :] / self.shape[1], self.shape)


class Flatten:
    trains = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray:
        return dy.reshape(self.shape)


class Network:
    """The ops of `spec` over `arrays`; `grads` holds gradient views of the arrays that train and
    `adapters` what sits beside weighted layers, by weight index."""

    def __init__(
        self,
        spec: Spec,
        arrays: Arrays,
        grads: Arrays | None = None,
        adapters: dict[int, Adapter] | None = None,
        batch_stats: bool = False,
    ) -> None:
        grads, adapters = grads or {}, adapters or {}
        self.spec = spec
        self.ops, self.starts = [], []  # starts: index of each block's first op
        for p in spec.placed():
            if not self.starts or p.block == len(self.starts):
                self.starts.append(len(self.ops))
            self.ops.append(_make(p, arrays, grads, adapters, batch_stats))
        trained = [i for i, op in enumerate(self.ops) if op.trains]
        self.lowest = min(trained, default=len(self.ops))  # backward stops here
        self.taps: list[np.ndarray] = []

    def forward(self, x0: np.ndarray, keep_taps: bool = False) -> np.ndarray:
        """Logits of standardised flat rows `x0`; with `keep_taps`, `self.taps` holds every
        block's input, flattened (the Skip-LoRA taps)."""
        n = len(x0)
        h = x0.reshape(n, *self.spec.input).transpose(0, 2, 1) if len(self.spec.input) == 2 else x0
        self.taps = [x0] if keep_taps else []
        for i, op in enumerate(self.ops):
            if keep_taps and i in self.starts[1:]:
                self.taps.append(h.reshape(n, -1))
            h = op.forward(h)
        return h

    def backward(self, dz: np.ndarray) -> None:
        """Gradients of every trainable from the gradient at the logits (after `forward`)."""
        delta = dz
        for i in range(len(self.ops) - 1, self.lowest - 1, -1):
            delta = self.ops[i].backward(delta, i > self.lowest)


def _make(p: Placed, arrays: Arrays, grads: Arrays, adapters: dict, batch_stats: bool):
    op = p.layer.op
    if op in ("linear", "conv1d"):
        return Dense(p, arrays, grads, adapters.get(p.k))
    if op == "depthwise":
        return Depthwise(p, arrays, grads, None)
    if op == "batchnorm":
        return BatchNorm(p, arrays, grads, batch_stats)
    if op == "maxpool":
        return MaxPool(p.layer.kernel)
    return {"relu": ReLU, "gap": GlobalAvgPool, "flatten": Flatten}[op]()
