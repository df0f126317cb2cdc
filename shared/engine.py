"""One fine-tuning step for any method of `shared.methods`, laid out for NumPy's per-call cost.

At batch 20 a step costs more in NumPy calls (1-3 us each) than in arithmetic, so the layout is
chosen to make every method's step a short, fixed list of calls, with no allocation:

- Every trainable array is a view into one flat vector `theta` (its gradient a view into `grad`):
  the SGD update is two calls whatever the method.
- Frozen batch norm is folded into its Linear layer (`shared.model.fold`); a layer whose weight or
  bias trains keeps the raw array in `theta` and refreshes its folded copy after each update.
- A batch lives in one buffer with columns `[y | x0 | x1 | x2 | z]`. The forward pass writes each
  layer's output into its slice, so the skip adapters' inputs form one block `[x0 | x1 | x2]` and
  the three products `x_k A_k` are one product with a block-diagonal A (kept block-diagonal by a
  gradient mask); the three `(x_k A_k) B_k` are one product with the stacked B.
- Skip2-LoRA fills the whole buffer with one `np.take` from the cache (`shared.cache`); the other
  methods take `[y | x0]` and compute the rest.

The loss is the mean softmax cross-entropy of the batch; `grad` holds its exact gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from skip2fleet.shared.cache import build_cache
from skip2fleet.shared.methods import LAYERS, Method
from skip2fleet.shared.model import Model, dims, fold, standardise
from skip2fleet.shared.predictor import Predictor

_matmul = np.matmul  # module-level so that `count_matmul_flops` can swap in a counting one


@dataclass
class _Lora:
    """A LoRA adapter beside one Linear layer and its per-batch buffers."""

    A: np.ndarray
    B: np.ndarray
    gA: np.ndarray
    gB: np.ndarray
    gain: np.ndarray | float  # alpha/r times the layer's batch-norm scale
    u: np.ndarray  # x @ A
    v: np.ndarray  # (x @ A) @ B * gain, then reused for its gradient
    du: np.ndarray
    dx: np.ndarray


class FineTuner:
    """The trainable state and preallocated buffers of one method on one base model."""

    def __init__(
        self,
        model: Model,
        method: Method,
        *,
        rank: int = 4,
        alpha: float | None = None,
        batch_size: int = 20,
        seed: int = 0,
        dtype: type = np.float32,
    ) -> None:
        self.model = {name: array.astype(dtype) for name, array in model.items()}
        self.method = method
        self.rank = rank
        self.scaling = (rank if alpha is None else alpha) / rank
        self.batch_size = batch_size
        self.dims = dims(model)
        self.folded = fold(self.model, dtype)
        init = np.random.default_rng([seed, 1])
        d, n, C = self.dims, batch_size, self.dims[3]
        width = sum(d[:3])

        shapes = trainable_shapes(method, self.dims, rank)
        self.theta = np.zeros(sum(int(np.prod(s)) for s in shapes.values()), dtype)
        self.grad = np.zeros_like(self.theta)
        self._step = np.zeros_like(self.theta)
        self.params = unflatten(self.theta, shapes)
        self.grads = unflatten(self.grad, shapes)

        # Batch buffer [y | x0 | x1 | x2 | z] and its views.
        self.buf = np.zeros((n, C + width + C), dtype)
        self.y = self.buf[:, :C]
        bounds = np.cumsum([C, d[0], d[1], d[2]])
        self.x = [self.buf[:, bounds[k] : bounds[k + 1]] for k in LAYERS]
        self.z = self.buf[:, bounds[3] :]
        self.out = [self.x[1], self.x[2], self.z]
        self.xcat = self.buf[:, C : C + width]
        self.dz = np.zeros((n, C), dtype)
        self.rows = np.zeros((n, 1), dtype)
        self.delta = [None] + [np.zeros((n, d[k]), dtype) for k in (1, 2)]
        self.active = [None] + [np.zeros((n, d[k]), bool) for k in (1, 2)]

        # Effective (folded) weight and bias per layer; trainable ones are refreshed after updates.
        self.weight, self.bias, self._refresh = [], [], []
        for k, layer in enumerate(self.folded):
            kind = method.base[k]
            weight = self.params[f"W{k}"] if kind == "all" else layer.weight
            bias = self.params[f"b{k}"] if kind != "frozen" else layer.bias
            if k < 2 and kind == "all":
                weight = np.empty_like(layer.weight)
                self._refresh.append((self.params[f"W{k}"], layer.scale, None, weight))
            if k < 2 and kind != "frozen":
                bias = np.empty_like(layer.bias)
                self._refresh.append((self.params[f"b{k}"], layer.scale, layer.shift, bias))
            self.weight.append(weight)
            self.bias.append(bias)
        for k in LAYERS:
            if method.base[k] != "frozen":
                self.params[f"b{k}"][...] = self.model[f"b{k}"]
            if method.base[k] == "all":
                self.params[f"W{k}"][...] = self.model[f"W{k}"]

        self.lora: dict[int, _Lora] = {}
        for k in method.lora:
            A, B = self.params[f"A{k}"], self.params[f"B{k}"]
            A[...] = _kaiming_uniform(init, A.shape)
            self.lora[k] = _Lora(
                A=A,
                B=B,
                gA=self.grads[f"A{k}"],
                gB=self.grads[f"B{k}"],
                gain=self.folded[k].scale * self.scaling,
                u=np.zeros((n, rank), dtype),
                v=np.zeros((n, d[k + 1]), dtype),
                du=np.zeros((n, rank), dtype),
                dx=np.zeros((n, d[k]), dtype),
            )

        self.pairs = adapter_pairs(method, self.dims, rank)
        if method.skip:
            A = self.params["A_skip"]
            self.skip_mask = np.zeros(A.shape, dtype)
            for pair in (p for p in self.pairs if p.skip):
                A[pair.rows, pair.cols] = _kaiming_uniform(init, (d[pair.layer], rank))
                self.skip_mask[pair.rows, pair.cols] = self.scaling
            self.H = np.zeros((n, A.shape[1]), dtype)
            self.dH = np.zeros_like(self.H)
            self.V = np.zeros((n, C), dtype)
        self.refresh()
        self.source: np.ndarray | None = None

    # -- data ---------------------------------------------------------------------------------

    def attach(self, x: np.ndarray, y: np.ndarray, cache: np.ndarray | None = None) -> None:
        """Set the fine-tuning set: raw features and integer labels (Skip2: and its cache)."""
        onehot = np.eye(self.dims[3], dtype=self.theta.dtype)[y]
        if self.method.cached:
            cache = build_cache(self.model, x) if cache is None else cache
            self.source = np.hstack([onehot, cache.astype(self.theta.dtype, copy=False)])
        else:
            self.source = np.hstack([onehot, standardise(self.model, x)])
        self._gathered = self.buf[:, : self.source.shape[1]]

    # -- one step ------------------------------------------------------------------------------

    def forward(self, idx: np.ndarray) -> None:
        """Logits of the batch `idx` of the attached set, into `self.z`."""
        self.source.take(idx, axis=0, out=self._gathered, mode="clip")
        if not self.method.cached:
            for k in LAYERS:
                x, out = self.x[k], self.out[k]
                _matmul(x, self.weight[k], out=out)
                out += self.bias[k]
                lora = self.lora.get(k)
                if lora is not None:
                    _matmul(x, lora.A, out=lora.u)
                    _matmul(lora.u, lora.B, out=lora.v)
                    lora.v *= lora.gain
                    out += lora.v
                if k < 2:
                    np.maximum(out, 0, out=out)
        if self.method.skip:
            _matmul(self.xcat, self.params["A_skip"], out=self.H)
            self.H *= self.scaling  # H holds (x A) * alpha/r, so B's gradient needs no rescaling
            _matmul(self.H, self.params["B_skip"], out=self.V)
            self.z += self.V

    def backward(self) -> None:
        """Gradient of the batch's mean cross-entropy into `self.grad` (after `forward`)."""
        dz, rows = self.dz, self.rows
        np.maximum.reduce(self.z, axis=1, keepdims=True, out=rows)
        np.subtract(self.z, rows, out=dz)
        np.exp(dz, out=dz)
        np.add.reduce(dz, axis=1, keepdims=True, out=rows)
        dz /= rows
        dz -= self.y
        dz *= 1.0 / len(dz)
        if self.method.skip:
            g = self.grads
            _matmul(self.H.T, dz, out=g["B_skip"])
            _matmul(dz, self.params["B_skip"].T, out=self.dH)
            _matmul(self.xcat.T, self.dH, out=g["A_skip"])
            g["A_skip"] *= self.skip_mask
        delta = dz
        for k in range(2, self.method.reaches - 1, -1):
            delta = self._layer_backward(k, delta)

    def _layer_backward(self, k: int, delta: np.ndarray) -> np.ndarray | None:
        """Gradients of layer k's trainables from the gradient at its output; returns the one at
        its input (after the ReLU mask) when a lower layer still needs it."""
        x, kind, scale = self.x[k], self.method.base[k], self.folded[k].scale
        if kind == "all":
            gW = self.grads[f"W{k}"]
            _matmul(x.T, delta, out=gW)
            if k < 2:
                gW *= scale
        if kind != "frozen":
            gb = self.grads[f"b{k}"]
            np.add.reduce(delta, axis=0, out=gb)
            if k < 2:
                gb *= scale
        lora = self.lora.get(k)
        if lora is not None:
            np.multiply(delta, lora.gain, out=lora.v)
            _matmul(lora.u.T, lora.v, out=lora.gB)
            _matmul(lora.v, lora.B.T, out=lora.du)
            _matmul(x.T, lora.du, out=lora.gA)
        if k == self.method.reaches:
            return None
        below = self.delta[k]
        _matmul(delta, self.weight[k].T, out=below)
        if lora is not None:
            _matmul(lora.du, lora.A.T, out=lora.dx)
            below += lora.dx
        np.greater(x, 0, out=self.active[k])
        below *= self.active[k]
        return below

    def update(self, lr: float) -> None:
        """Plain SGD on every trainable array at once, then refresh folded copies."""
        np.multiply(self.grad, lr, out=self._step)
        self.theta -= self._step
        self.refresh()

    def refresh(self) -> None:
        """Recompute the folded weight and bias of layers whose raw arrays train."""
        for raw, scale, shift, folded in self._refresh:
            np.multiply(raw, scale, out=folded)
            if shift is not None:
                folded += shift

    # -- evaluation ----------------------------------------------------------------------------

    def loss(self, idx: np.ndarray) -> float:
        """Mean cross-entropy of the batch `idx` (runs `forward`)."""
        self.forward(idx)
        z = self.z.astype(np.float64)
        top = z.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
        return float(np.mean(log_norm - (z * self.y).sum(axis=1)))

    def adapters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable arrays, by name."""
        return {name: array.copy() for name, array in self.params.items()}

    def load(self, flat: np.ndarray) -> None:
        """Continue from trainable values saved as one flat vector (`theta`)."""
        if flat.shape != self.theta.shape:
            raise ValueError(f"expected {self.theta.size} values, got {flat.size}")
        self.theta[...] = flat
        self.refresh()

    def merged(self) -> Predictor:
        """The fine-tuned network for inference: adapters merged into plain matrices."""
        d, C = self.dims, self.dims[3]
        layers = [[self.weight[k].copy(), self.bias[k].copy()] for k in LAYERS]
        skips = []
        for pair in self.pairs:
            k = pair.layer
            product = self.params[pair.a][pair.rows, pair.cols] @ self.params[pair.b][pair.cols]
            if not pair.skip:
                layers[k][0] += product * self.lora[k].gain
            elif k == 2:
                layers[2][0] += product * self.scaling
            else:
                skips.append((k, product * self.scaling))
        # A skip from x_k (k < 2) rides along layer k's product as extra output columns.
        for k, product in skips:
            layers[k][0] = np.hstack([layers[k][0], product])
            layers[k][1] = np.concatenate([layers[k][1], np.zeros(C, product.dtype)])
        return Predictor(
            self.model["in_mean"], self.model["in_std"], [tuple(w_b) for w_b in layers], d[1:3]
        )


def trainable_shapes(
    method: Method, dims: tuple[int, ...], rank: int
) -> dict[str, tuple[int, ...]]:
    """Name and shape of every trainable array, in their order inside `theta`."""
    d, r = dims, rank
    shapes: dict[str, tuple[int, ...]] = {}
    for k in LAYERS:
        if method.base[k] == "all":
            shapes[f"W{k}"] = (d[k], d[k + 1])
        if method.base[k] != "frozen":
            shapes[f"b{k}"] = (d[k + 1],)
        if k in method.lora:
            shapes[f"A{k}"], shapes[f"B{k}"] = (d[k], r), (r, d[k + 1])
    if method.skip:
        shapes["A_skip"] = (sum(d[:3]), len(method.skip) * r)
        shapes["B_skip"] = (len(method.skip) * r, d[3])
    return shapes


def unflatten(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Views into `flat`, one per named shape, in order."""
    views, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        views[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return views


@dataclass(frozen=True)
class AdapterPair:
    """One low-rank product A @ B inside the named arrays: A[rows, cols] @ B[cols, :]."""

    a: str
    b: str
    rows: slice
    cols: slice
    layer: int  # LoRA: the Linear it sits beside; skip: the activation x_k it reads
    skip: bool


def adapter_pairs(method: Method, dims: tuple[int, ...], rank: int) -> list[AdapterPair]:
    """Every low-rank pair of a method: a LoRA adapter per layer, a block per skip adapter."""
    full = slice(None)
    pairs = [AdapterPair(f"A{k}", f"B{k}", full, full, k, False) for k in method.lora]
    starts = [int(s) for s in np.cumsum([0, *dims[:3]])]
    for block, k in enumerate(method.skip):
        rows, cols = slice(starts[k], starts[k + 1]), slice(block * rank, (block + 1) * rank)
        pairs.append(AdapterPair("A_skip", "B_skip", rows, cols, k, True))
    return pairs


def _kaiming_uniform(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """PEFT's LoRA-A init: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / np.sqrt(shape[0])
    return rng.uniform(-bound, bound, shape)


@contextmanager
def count_matmul_flops() -> Iterator[list[int]]:
    """Within the block, count 2*m*k*n for every matrix product the engine makes."""
    global _matmul
    counter = [0]

    def counting(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        counter[0] += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return np.matmul(a, b, out=out)

    _matmul = counting
    try:
        yield counter
    finally:
        _matmul = np.matmul
