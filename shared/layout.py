"""The layout of a method's trainable values on a model: one flat vector `theta`, named views.

Every trainable array of a method on a spec at a rank is a view into one flat vector `theta`, in
the order `shapes` lists them: each weighted layer's trained base arrays and adapter arrays, then
the stacked skip adapters. Both sides of the fleet derive the same layout from (method, spec,
rank), so `theta` travels and is saved with no names or shapes. Training (`shared.engine`),
aggregation (the low-rank `pairs`) and inference (`predictor`: the adapters merged into plain
matrices, no training state built) all read `theta` through this one layout.

There is no LoRA scaling alpha / r (it is 1): an adapter's product A @ B is its whole update, the
same at every rank, so devices of different ranks aggregate their products as they are and a
saved version needs nothing beside `theta` to predict.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from skip2fleet.shared.atomic import write_atomic
from skip2fleet.shared.methods import Method
from skip2fleet.shared.model import Model
from skip2fleet.shared.network import Arrays
from skip2fleet.shared.peft import ADAPTERS
from skip2fleet.shared.peft.skip import AdapterPair, skip_pairs
from skip2fleet.shared.predictor import Predictor
from skip2fleet.shared.spec import Spec

Skips = list[tuple[int, np.ndarray]]  # (tap, matrix from the tap straight into the logits)


class Layout:
    """Where each trainable array of `method` on `spec` at `rank` lives inside `theta`."""

    def __init__(self, method: Method, spec: Spec, rank: int) -> None:
        self.method, self.spec, self.rank = method, spec, rank
        self.shapes = _shapes(method, spec, rank)
        self.size = sum(int(np.prod(s)) for s in self.shapes.values())
        self.pairs = _pairs(method, spec, rank)
        self.paired = {name for p in self.pairs for name in (p.a, p.b)}
        self.plain = [name for name in self.shapes if name not in self.paired]

    def blocks(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        """`theta` block by block, as the coordinator screens a change: each pair's A and B
        (`pair_name`), and each array outside a pair by its name (views)."""
        views = self.views(theta)
        blocks = {}
        for p in self.pairs:
            blocks[f"{pair_name(p)} A"] = views[p.a][p.a_rows]
            blocks[f"{pair_name(p)} B"] = views[p.b][p.b_rows]
        return blocks | {name: views[name] for name in self.plain}

    def parts(self) -> list[str]:
        """The names of what `theta` adds to the model, the same at every rank: each pair's
        product (`pair_name`), then each array outside a pair."""
        return [pair_name(p) for p in self.pairs] + self.plain

    def part(self, theta: np.ndarray, name: str) -> np.ndarray:
        """One of `parts`: a pair's product A @ B (its whole update), or a plain array."""
        views = self.views(theta)
        for p in self.pairs:
            if pair_name(p) == name:
                return views[p.a][p.a_rows] @ views[p.b][p.b_rows]
        return views[name]

    def views(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        """Views into `theta`, one per trainable array, by name."""
        if theta.shape != (self.size,):
            raise ValueError(f"expected {self.size} values, got shape {theta.shape}")
        views, offset = {}, 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            views[name] = theta[offset : offset + size].reshape(shape)
            offset += size
        return views

    def merged(self, model: Model, theta: np.ndarray) -> tuple[Arrays, Skips]:
        """The base's arrays with `theta` merged in, in `theta`'s dtype (copies): trained base
        arrays replaced, each adapter folded into its layer's weight; and the skip matrices."""
        views = self.views(theta)
        arrays = {
            name: views.get(name, model[name]).astype(theta.dtype)
            for name in self.spec.array_shapes()
        }
        for p in self.method.adapted(self.spec):
            arrays[f"W{p.k}"] = ADAPTERS[self.method.adapter].merge(arrays[f"W{p.k}"], views, p.k)
        skips = [
            (p.layer, views[p.a][p.a_rows] @ views[p.b][p.b_rows]) for p in self.pairs if p.skip
        ]
        return arrays, skips

    def predictor(self, model: Model, theta: np.ndarray) -> Predictor:
        """The base with `theta` merged: one forward pass for inference, whatever the method."""
        arrays, skips = self.merged(model, theta)
        return Predictor(self.spec, arrays, skips)

    def save(self, path: Path, theta: np.ndarray, base_sha256: str) -> Path:
        """Write the trained arrays by name, with the method, rank and base hash they belong to."""
        meta = {
            "meta.method": self.method.name,
            "meta.rank": self.rank,
            "meta.base_sha256": base_sha256,
        }
        content = {**self.views(theta), **{key: np.array(value) for key, value in meta.items()}}
        return write_atomic(path, lambda handle: np.savez(handle, **content))


def pair_name(pair: AdapterPair) -> str:
    """A pair as people read it: the skip adapter of a tap, or the LoRA beside a layer."""
    return f"skip tap {pair.layer}" if pair.skip else f"layer {pair.layer}"


@functools.cache
def layout(method: Method, spec: Spec, rank: int) -> Layout:
    """The layout of `method` on `spec` at `rank` (made once per process: a round asks for it per
    reply)."""
    return Layout(method, spec, rank)


def _shapes(method: Method, spec: Spec, rank: int) -> dict[str, tuple[int, ...]]:
    """Name and shape of every trainable array, in their order inside `theta`."""
    base = spec.array_shapes()
    weights, biases = method.trained("weights", spec), method.trained("biases", spec)
    norms = {p.k for p in spec.placed() if p.layer.op == "batchnorm"} if method.batchnorm else set()
    adapted = {p.k: p for p in method.adapted(spec)}
    shapes: dict[str, tuple[int, ...]] = {}
    for p in spec.weighted():
        k = p.k
        names = [f"W{k}"] * (k in weights) + [f"b{k}"] * (k in biases)
        names += [f"gamma{k}", f"beta{k}"] * (k in norms)
        shapes.update({name: base[name] for name in names})
        if k in adapted:
            shapes.update(ADAPTERS[method.adapter].shapes(p, rank))
    if method.skip:
        taps = spec.taps()
        shapes["A_skip"] = (sum(taps), rank)
        shapes["B_skip"] = (len(taps) * rank, spec.n_classes)
    return shapes


def _pairs(method: Method, spec: Spec, rank: int) -> list[AdapterPair]:
    """Every low-rank pair of a method: one per adapted layer, one per skip tap."""
    full = slice(None)
    pairs = [
        AdapterPair(f"A{p.k}", f"B{p.k}", full, full, p.k, False) for p in method.adapted(spec)
    ]
    return pairs + (skip_pairs(spec.taps(), rank) if method.skip else [])
