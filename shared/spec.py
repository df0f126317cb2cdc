"""A network as data: a small, versioned, hashable description that travels with the base model.

The engine, the merged predictor, the Skip2 cache, pretraining and the adapters' wire layout are all
derived from this one description, so a new model is a new spec, never new code. A spec is an input
shape and a list of blocks, each a list of layers. Block boundaries are where Skip-LoRA taps the
network: the input of every block (the network's input, then each inner block's output, flattened)
feeds an adapter straight into the logits.

Shapes: a vector is `(width,)`; a sequence is `(length, channels)` inside the engine (channels last,
so a convolution's im2col rows and its output need no transpose). The spec's `input` is written the
way data is stored, `(features,)` or `(channels, length)`, and every sample is one flat row of
channel-major values. Convolutions pad to keep the length ("same", odd kernels) and have stride 1;
pooling has stride equal to its size. Weights are 2-D, `(fan_in, out)` (a convolution's im2col
column `c * kernel + j` is channel c at offset j), and a layer's arrays are named after its index k
among the weighted layers: `W{k}`, `b{k}`, and `gamma{k}`, `beta{k}`, `mean{k}`, `var{k}` for the
batch norm right after it. Conv2d would be a new op with its own im2col and shape rule.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from skip2fleet.shared.errors import FleetError

SPEC_VERSION = 1
WEIGHTED = ("linear", "conv1d", "depthwise")
OPS = (*WEIGHTED, "batchnorm", "relu", "maxpool", "gap", "flatten")


@dataclass(frozen=True)
class Layer:
    op: str  # one of OPS
    out: int = 0  # linear, conv1d: output width or channels
    kernel: int = 0  # conv1d, depthwise: kernel size; maxpool: pool size


@dataclass(frozen=True)
class Placed:
    """A layer where it sits: its block, its shapes, and the index k of its weighted layer."""

    layer: Layer
    block: int
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    k: int  # this layer's weight index (weighted layers), or the one it follows (batch norm)

    @property
    def weight_shape(self) -> tuple[int, int]:
        op, shape = self.layer.op, self.shape_in
        if op == "linear":
            return (shape[0], self.layer.out)
        if op == "conv1d":
            return (shape[1] * self.layer.kernel, self.layer.out)
        return (self.layer.kernel, shape[1])  # depthwise: one kernel per channel

    @property
    def adaptable(self) -> bool:
        """Whether a LoRA or DoRA adapter may sit beside it: not on a depthwise layer, where even
        rank 1 (A: C x r convolution with the kernel, B: r x C) outgrows the layer's C x k."""
        return self.layer.op in ("linear", "conv1d")


@dataclass(frozen=True)
class Spec:
    input: tuple[int, ...]  # (features,) or (channels, length)
    blocks: tuple[tuple[Layer, ...], ...]
    version: int = SPEC_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        try:
            data = json.loads(text)
            if data["version"] != SPEC_VERSION:
                raise FleetError(f"model spec version {data['version']}, expected {SPEC_VERSION}")
            blocks = tuple(tuple(Layer(**layer) for layer in block) for block in data["blocks"])
            spec = cls(tuple(data["input"]), blocks)
        except (ValueError, KeyError, TypeError) as exc:
            raise FleetError(f"not a model spec ({exc})") from None
        spec.placed()  # validates
        return spec

    @property
    def width(self) -> int:
        """Values per sample (a flat row)."""
        return int(_product(self.input))

    def placed(self) -> list[Placed]:
        """Every layer with its shapes and weight index; raises on a spec that does not chain."""
        shape = (self.input[1], self.input[0]) if len(self.input) == 2 else tuple(self.input)
        k, bn_of, placed = -1, None, []
        for block_index, block in enumerate(self.blocks):
            for layer in block:
                if layer.op not in OPS:
                    raise FleetError(f"unknown layer {layer.op!r}; choose from {', '.join(OPS)}")
                if layer.op in WEIGHTED:
                    k += 1
                elif layer.op == "batchnorm" and (
                    bn_of == k or placed[-1].layer.op not in WEIGHTED
                ):
                    raise FleetError("a batch norm must follow a linear or convolution layer")
                if layer.op == "batchnorm":
                    bn_of = k
                out = _shape_out(layer, shape)
                placed.append(Placed(layer, block_index, shape, out, k))
                shape = out
        if len(shape) != 1 or k < 0:
            raise FleetError("a model must end in a vector of logits after a weighted layer")
        return placed

    @property
    def n_classes(self) -> int:
        return self.placed()[-1].shape_out[0]

    def weighted(self) -> list[Placed]:
        return [p for p in self.placed() if p.layer.op in WEIGHTED]

    def taps(self) -> list[int]:
        """Widths of the Skip-LoRA taps: the input of every block."""
        placed = self.placed()
        widths = [self.width]
        for block in range(1, len(self.blocks)):
            first = next(p for p in placed if p.block == block)
            widths.append(int(_product(first.shape_in)))
        return widths

    def array_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name and shape of every array of a base model of this spec."""
        shapes: dict[str, tuple[int, ...]] = {"in_mean": (self.width,), "in_std": (self.width,)}
        for p in self.placed():
            if p.layer.op in WEIGHTED:
                shapes[f"W{p.k}"] = p.weight_shape
                shapes[f"b{p.k}"] = (p.shape_out[-1],)
            elif p.layer.op == "batchnorm":
                for name in ("gamma", "beta", "mean", "var"):
                    shapes[f"{name}{p.k}"] = (p.shape_out[-1],)
        return shapes


def _product(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def _shape_out(layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    op, sequence = layer.op, len(shape) == 2
    if op in ("batchnorm", "relu"):
        return shape
    if op == "linear":
        if sequence:
            raise FleetError("linear takes a vector; add gap or flatten before it")
        return (layer.out,)
    if not sequence:
        raise FleetError(f"{op} takes a sequence (length, channels)")
    if op in ("conv1d", "depthwise") and layer.kernel % 2 == 0:
        raise FleetError(f"{op}: kernel must be odd (same padding)")
    if op == "conv1d":
        return (shape[0], layer.out)
    if op == "depthwise":
        return shape
    if op == "maxpool":
        if layer.kernel < 1 or shape[0] // layer.kernel < 1:
            raise FleetError(f"maxpool {layer.kernel} does not fit length {shape[0]}")
        return (shape[0] // layer.kernel, shape[1])
    if op == "gap":
        return (shape[1],)
    return (shape[0] * shape[1],)  # flatten


def describe(spec: Spec) -> str:
    """A short human description: the layers' ops and widths, and the parameter count."""
    parts = []
    for p in spec.placed():
        op = p.layer.op
        if op in WEIGHTED:
            parts.append(f"{op}{p.layer.kernel or ''}:{p.shape_out[-1]}")
        elif op in ("maxpool", "gap", "flatten"):
            parts.append(op)
    count = sum(
        int(_product(shape))
        for name, shape in spec.array_shapes().items()
        if not name.startswith(("in_", "mean", "var"))
    )
    shape = "x".join(map(str, spec.input))
    return f"{shape} -> {' '.join(parts)} ({count} parameters)"


# -- built-in models ------------------------------------------------------------------------------

HIDDEN = 96
CNN_WIDTHS = (16, 32, 64)
KERNEL = 5


def mlp(features: int, n_classes: int, hidden: int = HIDDEN) -> Spec:
    """The paper's network: features -> hidden -> hidden -> classes, batch norm and ReLU between."""
    inner = (Layer("batchnorm"), Layer("relu"))
    return Spec(
        (features,),
        (
            (Layer("linear", hidden), *inner),
            (Layer("linear", hidden), *inner),
            (Layer("linear", n_classes),),
        ),
    )


def _head(n_classes: int) -> tuple[Layer, ...]:
    return (Layer("gap"), Layer("linear", n_classes))


def cnn(channels: int, length: int, n_classes: int, widths: tuple[int, ...] = CNN_WIDTHS) -> Spec:
    """Blocks of conv k=5 -> batch norm -> ReLU -> max pool 2, global average pool, linear head."""
    blocks = tuple(
        (Layer("conv1d", w, KERNEL), Layer("batchnorm"), Layer("relu"), Layer("maxpool", 0, 2))
        for w in widths
    )
    return Spec((channels, length), (*blocks, _head(n_classes)))


def dscnn(channels: int, length: int, n_classes: int, widths: tuple[int, ...] = CNN_WIDTHS) -> Spec:
    """The CNN with depthwise-separable blocks (MobileNet): a plain conv first (a depthwise conv
    over a few raw channels learns little), then depthwise k=5 and pointwise, each with BN-ReLU."""
    first = (
        Layer("conv1d", widths[0], KERNEL),
        Layer("batchnorm"),
        Layer("relu"),
        Layer("maxpool", 0, 2),
    )
    blocks = tuple(
        (
            Layer("depthwise", 0, KERNEL),
            Layer("batchnorm"),
            Layer("relu"),
            Layer("conv1d", w, 1),
            Layer("batchnorm"),
            Layer("relu"),
            Layer("maxpool", 0, 2),
        )
        for w in widths[1:]
    )
    return Spec((channels, length), (first, *blocks, _head(n_classes)))


MODELS = ("mlp", "cnn", "dscnn")


def input_form(name: str) -> str:
    """The data form (`shared.datasets.FORMS`) a built-in model reads."""
    return "features" if name == "mlp" else "windows"


def form_of(spec: Spec) -> str:
    """The data form a spec reads: windows for (channels, length) inputs, else features."""
    return "windows" if len(spec.input) == 2 else "features"


def build(name: str, shape: tuple[int, ...], n_classes: int) -> Spec:
    """The built-in model `name` for samples of `shape` ((features,) or (channels, length))."""
    if name == "mlp":
        return mlp(int(_product(shape)), n_classes)
    if name not in MODELS:
        raise FleetError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if len(shape) != 2:
        raise FleetError(f"model {name} takes (channels, length) windows, the data is {shape}")
    return (cnn if name == "cnn" else dscnn)(shape[0], shape[1], n_classes)
