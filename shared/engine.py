"""One fine-tuning step for any method of `shared.methods` on any model of `shared.spec`.

At batch 20 a step costs more in NumPy calls (1-3 us each) than in arithmetic on the MLP, so:

- Every trainable array is a view into one flat vector `theta` (its gradient a view into `grad`),
  laid out by `shared.layout`: the SGD update is two calls whatever the method; the network's ops
  read and write these views.
- A batch lives in one contiguous buffer with columns `[x_0 | x_1 | ... | z]` (the skip taps,
  then the logits): Skip2-LoRA fills all of it from the cache (`shared.cache`: one `np.take`, or a
  dequantizing gather) and never runs the base; the other methods take `x_0` and run the network
  (`shared.network`), whose backward pass stops at the lowest layer with anything to train.

The method's declaration decides everything: which base arrays join `theta`, which adapter sits
beside which layer, the skip adapters, the cache and the optimizer. The loss is the mean softmax
cross-entropy of the batch; `grad` holds its exact gradient (DoRA: with its norm held constant).
"""

from __future__ import annotations

import itertools

import numpy as np

from skip2fleet.shared.cache import Cache, Codec, build_cache
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import Method
from skip2fleet.shared.model import SPEC_KEY, Model, cross_entropy, spec_of, standardise
from skip2fleet.shared.network import Network
from skip2fleet.shared.peft import ADAPTERS, OPTIMIZERS
from skip2fleet.shared.peft.galore import INTERVAL, SCALE
from skip2fleet.shared.peft.skip import Skip
from skip2fleet.shared.predictor import Predictor


class FineTuner:
    """The trainable state and preallocated buffers of one method on one base model."""

    def __init__(
        self,
        model: Model,
        method: Method,
        *,
        rank: int = 4,
        batch_size: int = 20,
        seed: int = 0,
        dtype: type = np.float32,
        galore_interval: int = INTERVAL,
        galore_scale: float = SCALE,
        batch_stats: bool = False,
    ) -> None:
        self.spec = spec_of(model)
        self.model = {k: v if k == SPEC_KEY else v.astype(dtype) for k, v in model.items()}
        self.method, self.rank, self.batch_size = method, rank, batch_size
        self.galore_interval, self.galore_scale = galore_interval, galore_scale
        init = np.random.default_rng([seed, 1])
        n, C, taps = batch_size, self.spec.n_classes, self.spec.taps()

        self.layout = layout(method, self.spec, rank)
        self.theta = np.zeros(self.layout.size, dtype)
        self.grad = np.zeros_like(self.theta)
        self.params = self.layout.views(self.theta)
        self.grads = self.layout.views(self.grad)
        for name, view in self.params.items():
            if name in self.model:  # a base array that trains: it lives in theta from now on
                view[...] = self.model[name]
                self.model[name] = view
        arrays = dict(self.model)
        self.layer_adapters = {
            p.k: ADAPTERS[method.adapter](p.k, self.params, self.grads, arrays[f"W{p.k}"], init)
            for p in method.adapted(self.spec)
        }
        self.network = Network(self.spec, arrays, self.grads, self.layer_adapters, batch_stats)
        self.optimizer = OPTIMIZERS[method.optimizer](self)

        # Batch buffer [x_0 | x_1 | ... | z] (a Skip2 cache row) and its views; one-hot labels.
        self.buf = np.zeros((n, sum(taps) + C), dtype)
        bounds = [int(b) for b in np.cumsum([0, *taps])]
        self.taps = [self.buf[:, a:b] for a, b in itertools.pairwise(bounds)]
        self.z = self.buf[:, bounds[-1] :]
        self.y = np.zeros((n, C), dtype)
        self.dz = np.zeros((n, C), dtype)
        self.rows = np.zeros((n, 1), dtype)
        self.cache: Cache | None = None

        skips = [p for p in self.layout.pairs if p.skip]
        self.skip = Skip(self.params, self.grads, skips, self.taps, init) if skips else None

    # -- data ---------------------------------------------------------------------------------

    def attach(
        self, x: np.ndarray, y: np.ndarray, cache: Cache | None = None, codec: Codec = Codec.F32
    ) -> None:
        """Set the fine-tuning set: raw samples and integer labels (Skip2: and its cache, built
        here with `codec` unless given)."""
        self.labels = np.eye(self.spec.n_classes, dtype=self.theta.dtype)[y]
        if self.method.cached:
            self.cache = build_cache(self.model, x, codec) if cache is None else cache
        else:
            self.inputs = standardise(self.model, x)

    @property
    def samples(self) -> int:
        return len(self.labels)

    # -- one step ------------------------------------------------------------------------------

    def forward(self, idx: np.ndarray) -> None:
        """Logits of the batch `idx` of the attached set, into `self.z`."""
        self.labels.take(idx, axis=0, out=self.y, mode="clip")
        if self.method.cached:
            self.cache.gather(idx, self.buf)
        else:
            self.inputs.take(idx, axis=0, out=self.taps[0], mode="clip")
            z = self.network.forward(self.taps[0], keep_taps=self.skip is not None)
            if self.skip is not None:
                for view, tap in zip(self.taps[1:], self.network.taps[1:], strict=True):
                    view[...] = tap
            self.z[...] = z
        if self.skip is not None:
            self.skip.forward(self.z)

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
        if self.skip is not None:
            self.skip.backward(dz)
        self.network.backward(dz)

    def update(self, lr: float) -> None:
        """One step of the method's optimizer on every trainable array at once."""
        self.optimizer.update(lr)

    # -- evaluation ----------------------------------------------------------------------------

    def loss(self, idx: np.ndarray) -> float:
        """Mean cross-entropy of the batch `idx` (runs `forward`)."""
        self.forward(idx)
        return cross_entropy(self.z, np.argmax(self.y, axis=1))

    def adapters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable arrays, by name."""
        return {name: array.copy() for name, array in self.params.items()}

    def load(self, flat: np.ndarray) -> None:
        """Continue from trainable values saved as one flat vector (`theta`)."""
        if flat.shape != self.theta.shape:
            raise ValueError(f"expected {self.theta.size} values, got {flat.size}")
        self.theta[...] = flat

    def merged(self) -> Predictor:
        """The fine-tuned network for inference: adapters merged into plain matrices."""
        return self.layout.predictor(self.model, self.theta)
