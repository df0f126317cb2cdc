"""The one forward and backward pass of any spec (`shared.spec`), over named arrays.

Training, the Skip2 cache, merged inference and pretraining all run these ops, so the network is
written once. An op's `forward` keeps what its `backward` needs; `backward` writes the gradients of
the op's trainable arrays into the views it was given (slices of the engine's flat `grad`) and
returns the gradient at its input only when a lower op still needs one. Batch norm runs on frozen
running statistics (fine-tuning, inference) or on batch statistics (pretraining). Convolutions are
im2col plus one product per group, channels last; adapters beside a weighted layer see the same
im2col rows. A depthwise convolution (one input channel per group) is k multiply-adds per output
instead, and a residual runs its two paths and adds them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from skip2fleet.shared import flops
from skip2fleet.shared.flops import INPUT_GRAD, WEIGHT_GRAD, matmul
from skip2fleet.shared.spec import POOLS_2D, Placed, Spec

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


class Window2d:
    """Where a 2-D kernel reads: `layer`'s window, stride and pads over (N, H, W, C) images."""

    def __init__(self, p: Placed) -> None:
        self.kh, self.kw = p.layer.window
        self.sh, self.sw = p.layer.stride
        self.top, self.left, self.bottom, self.right = p.layer.pads
        self.oh, self.ow = p.shape_out[:2]
        self.offsets = [(i, j) for i in range(self.kh) for j in range(self.kw)]
        self.plain = self.kh == self.kw == 1 and not any(p.layer.pads)

    def pad(self, x: np.ndarray, value: float = 0.0) -> np.ndarray:
        if not (self.top or self.left or self.bottom or self.right):
            return x
        n, h, w, c = x.shape
        shape = (n, h + self.top + self.bottom, w + self.left + self.right, c)
        padded = np.full(shape, value, x.dtype)
        padded[:, self.top : self.top + h, self.left : self.left + w] = x
        return padded

    def crop(self, padded: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return padded[:, self.top : self.top + shape[1], self.left : self.left + shape[2]]

    def at(self, padded: np.ndarray, i: int, j: int) -> np.ndarray:
        """The (N, OH, OW, C) view of what kernel offset (i, j) reads at every output."""
        rows = slice(i, i + self.sh * (self.oh - 1) + 1, self.sh)
        return padded[:, rows, j : j + self.sw * (self.ow - 1) + 1 : self.sw]

    def im2col(self, x: np.ndarray) -> np.ndarray:
        """(N, H, W, C) -> (N*OH*OW, C*kh*kw), column c*kh*kw + i*kw + j."""
        if self.plain:
            x = x[:, :: self.sh, :: self.sw] if self.sh * self.sw > 1 else x
            return x.reshape(-1, x.shape[-1])
        windows = np.lib.stride_tricks.sliding_window_view(self.pad(x), (self.kh, self.kw), (1, 2))
        windows = windows[:, :: self.sh, :: self.sw][:, : self.oh, : self.ow]
        return windows.reshape(-1, windows.shape[3] * self.kh * self.kw)

    def col2im(self, dcols: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The gradient at x from the gradient at its im2col rows (the adjoint of `im2col`)."""
        n, _, _, channels = shape
        if self.plain and self.sh * self.sw == 1:
            return dcols.reshape(shape)
        d = dcols.reshape(n, self.oh, self.ow, channels, self.kh * self.kw)
        d = np.ascontiguousarray(np.moveaxis(d, -1, 0))
        height, width = shape[1] + self.top + self.bottom, shape[2] + self.left + self.right
        padded = np.zeros((n, height, width, channels), dcols.dtype)
        for q, (i, j) in enumerate(self.offsets):
            self.at(padded, i, j)[...] += d[q]
        return self.crop(padded, shape)


class Dense:
    """Linear, conv1d or conv2d: `out = cols(x) @ W + b`, one product per group of channels."""

    def __init__(self, p: Placed, arrays: Arrays, grads: Arrays, adapter: Adapter | None) -> None:
        op = p.layer.op
        self.kernel = p.layer.kernel if op == "conv1d" else 0
        self.window = Window2d(p) if op == "conv2d" else None
        self.shape_out = p.shape_out
        self.W, self.b = arrays[f"W{p.k}"], arrays[f"b{p.k}"]
        self.gW, self.gb = grads.get(f"W{p.k}"), grads.get(f"b{p.k}")
        groups = p.layer.groups if op == "conv2d" else 1
        rows, outs = self.W.shape[0], self.W.shape[1] // groups
        self.groups = [
            (slice(g * rows, (g + 1) * rows), slice(g * outs, (g + 1) * outs))
            for g in range(groups)
        ]
        self.adapter = adapter
        self.trains = self.gW is not None or self.gb is not None or adapter is not None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.shape = x.shape
        if self.window is not None:
            self.cols = self.window.im2col(x)
        else:
            self.cols = im2col(x, self.kernel) if self.kernel else x
        self.weight = self.W if self.adapter is None else self.adapter.weight(self.W)
        if len(self.groups) == 1:
            out = matmul(self.cols, self.weight)
        else:
            out = np.empty((len(self.cols), self.W.shape[1]), self.cols.dtype)
            for rows, outs in self.groups:
                matmul(self.cols[:, rows], self.weight[:, outs], out=out[:, outs])
        out += self.b
        if self.adapter is not None:
            self.adapter.add(self.cols, out)
        return out.reshape(x.shape[0], *self.shape_out) if x.ndim > 2 else out

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        d = dy.reshape(-1, dy.shape[-1])
        dweight = None
        if self.gW is not None:
            dweight = self._per_group(self.cols.T, d, self.gW)
        elif self.adapter is not None and self.adapter.needs_weight_grad:
            dweight = matmul(self.cols.T, d, kind=WEIGHT_GRAD)
        if self.gb is not None:
            np.add.reduce(d, axis=0, out=self.gb)
        adapter = self.adapter
        extra = None if adapter is None else adapter.backward(self.cols, d, dweight, need_dx)
        if not need_dx:
            return None
        if len(self.groups) == 1:
            dcols = matmul(d, self.weight.T, kind=INPUT_GRAD)
        else:
            dcols = np.empty(self.cols.shape, d.dtype)
            for rows, outs in self.groups:
                matmul(d[:, outs], self.weight[:, outs].T, out=dcols[:, rows], kind=INPUT_GRAD)
        if extra is not None:
            dcols += extra
        if self.window is not None:
            return self.window.col2im(dcols, self.shape)
        return col2im(dcols, self.shape, self.kernel) if self.kernel else dcols

    def _per_group(self, cols_t: np.ndarray, d: np.ndarray, out: np.ndarray) -> np.ndarray:
        if len(self.groups) == 1:
            return matmul(cols_t, d, out=out, kind=WEIGHT_GRAD)
        for rows, outs in self.groups:
            matmul(cols_t[rows], d[:, outs], out=out[:, outs], kind=WEIGHT_GRAD)
        return out


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


class Depthwise2d:
    """A conv2d whose groups each read one input channel: output channel o is
    `sum_(i,j) W[i*kw + j, o] x[.., c(o)] + b[o]` with c(o) = o // (out / channels), so a
    channel multiplier above 1 repeats the input channels."""

    def __init__(self, p: Placed, arrays: Arrays, grads: Arrays) -> None:
        self.window = Window2d(p)
        self.repeat = p.layer.out // p.shape_in[-1]
        self.W, self.b = arrays[f"W{p.k}"], arrays[f"b{p.k}"]
        self.gW, self.gb = grads.get(f"W{p.k}"), grads.get(f"b{p.k}")
        self.trains = self.gW is not None or self.gb is not None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.shape = x.shape
        x = np.repeat(x, self.repeat, axis=-1) if self.repeat > 1 else x
        self.padded = window = self.window.pad(x)
        out = None
        for q, (i, j) in enumerate(self.window.offsets):
            term = self.window.at(window, i, j) * self.W[q]
            out = term if out is None else np.add(out, term, out=out)
        out += self.b
        flops.add(2 * out.size * len(self.window.offsets))
        return out

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        window, offsets = self.window, self.window.offsets
        if self.gW is not None:
            for q, (i, j) in enumerate(offsets):
                self.gW[q] = np.einsum("nhwc,nhwc->c", dy, window.at(self.padded, i, j))
            flops.add(2 * dy.size * len(offsets), WEIGHT_GRAD)
        if self.gb is not None:
            self.gb[...] = dy.sum(axis=(0, 1, 2))
        if not need_dx:
            return None
        padded = np.zeros_like(self.padded)
        for q, (i, j) in enumerate(offsets):
            window.at(padded, i, j)[...] += dy * self.W[q]
        flops.add(2 * dy.size * len(offsets), INPUT_GRAD)
        dx = window.crop(padded, (*self.shape[:3], padded.shape[-1]))
        if self.repeat > 1:
            dx = dx.reshape(*dx.shape[:3], -1, self.repeat).sum(axis=-1)
        return dx


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


class ReLU6:
    """min(max(x, 0), 6), MobileNet's activation (ONNX: Clip 0 6)."""

    trains = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.out = np.clip(x, 0, 6)
        return self.out

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray:
        return dy * ((self.out > 0) & (self.out < 6))


class Pool2d:
    """Max or average pooling over 2-D windows (any stride, max pooling padded with -inf). Max:
    the first of equal maxima takes the gradient; overlapping windows add their gradients."""

    trains = False

    def __init__(self, p: Placed) -> None:
        self.window, self.max = Window2d(p), p.layer.op == "maxpool2d"

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.shape, window = x.shape, self.window
        padded = window.pad(x, -np.inf) if self.max else x
        views = [window.at(padded, i, j) for i, j in window.offsets]
        best = views[0].copy()
        if not self.max:
            for view in views[1:]:
                best += view
            best *= 1.0 / len(views)
            return best
        self.where = np.zeros(best.shape, np.int16)
        for q, view in enumerate(views[1:], start=1):
            better = view > best
            np.maximum(best, view, out=best)
            self.where = np.where(better, np.int16(q), self.where)
        return best

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray:
        window = self.window
        n, h, w, c = self.shape
        height, width = h + window.top + window.bottom, w + window.left + window.right
        padded = np.zeros((n, height, width, c), dy.dtype)
        share = dy * (1.0 / len(window.offsets)) if not self.max else None
        for q, (i, j) in enumerate(window.offsets):
            window.at(padded, i, j)[...] += share if share is not None else dy * (self.where == q)
        return window.crop(padded, self.shape)


class GlobalAvgPool:
    """The mean over every position of a sequence or an image."""

    trains = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.shape = x.shape
        return x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray:
        positions = int(np.prod(self.shape[1:-1]))
        spread = np.broadcast_to(dy[:, None, :] / positions, (len(dy), positions, dy.shape[-1]))
        return spread.reshape(self.shape)


class Flatten:
    trains = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray:
        return dy.reshape(self.shape)


class Residual:
    """`branch(x) + shortcut(x)`, the shortcut the identity when it has no ops. Backward runs
    each path only as far down as it has something to train, or whole when the gradient at x is
    needed."""

    def __init__(self, branch: list, shortcut: list) -> None:
        self.paths = [branch, shortcut]
        self.trains = any(op.trains for path in self.paths for op in path)

    def forward(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for path in self.paths:
            h = x
            for op in path:
                h = op.forward(h)
            outs.append(h)
        return outs[0] + outs[1]

    def backward(self, dy: np.ndarray, need_dx: bool) -> np.ndarray | None:
        dx = None
        for path in self.paths:
            trained = [i for i, op in enumerate(path) if op.trains]
            lowest = 0 if need_dx else min(trained, default=len(path))
            delta = dy
            for i in range(len(path) - 1, lowest - 1, -1):
                delta = path[i].backward(delta, need_dx or i > lowest)
            if need_dx:
                dx = delta if dx is None else dx + delta
        return dx


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
        placed = spec.placed()

        def make(index: int):
            p = placed[index]
            if p.layer.op != "residual":
                return _make(p, arrays, grads, adapters, batch_stats)
            paths = [
                [make(i) for i, q in enumerate(placed) if q.parent == index and q.part == part]
                for part in ("branch", "shortcut")
            ]
            return Residual(*paths)

        self.ops, self.starts = [], []  # starts: index of each block's first op
        for index, p in enumerate(placed):
            if p.parent >= 0:
                continue
            if not self.starts or p.block == len(self.starts):
                self.starts.append(len(self.ops))
            self.ops.append(make(index))
        trained = [i for i, op in enumerate(self.ops) if op.trains]
        self.lowest = min(trained, default=len(self.ops))  # backward stops here
        self.taps: list[np.ndarray] = []
        shape = spec.engine_input  # a row's values as stored, and the order that puts them there
        if len(shape) == 1 or spec.channels_last:
            self.layout = (shape, None)
        else:
            self.layout = (spec.input, (0, *range(2, len(shape) + 1), 1))

    def every_op(self) -> list:
        """Every op, those inside residual paths included."""

        def inside(ops: list) -> list:
            found = []
            for op in ops:
                found.append(op)
                if isinstance(op, Residual):
                    found += [inner for path in op.paths for inner in inside(path)]
            return found

        return inside(self.ops)

    def forward(self, x0: np.ndarray, keep_taps: bool = False) -> np.ndarray:
        """Logits of standardised flat rows `x0`; with `keep_taps`, `self.taps` holds every
        block's input, flattened (the Skip-LoRA taps)."""
        n = len(x0)
        shape, order = self.layout
        h = x0.reshape(n, *shape)
        if order is not None:
            h = h.transpose(order)
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
    if op == "conv2d" and p.layer.groups > 1 and p.weight_shape[0] == np.prod(p.layer.window):
        return Depthwise2d(p, arrays, grads)
    if op in ("linear", "conv1d", "conv2d"):
        return Dense(p, arrays, grads, adapters.get(p.k))
    if op == "depthwise":
        return Depthwise(p, arrays, grads, None)
    if op == "batchnorm":
        return BatchNorm(p, arrays, grads, batch_stats)
    if op == "maxpool":
        return MaxPool(p.layer.kernel)
    if op in POOLS_2D:
        return Pool2d(p)
    return {"relu": ReLU, "relu6": ReLU6, "gap": GlobalAvgPool, "flatten": Flatten}[op]()
