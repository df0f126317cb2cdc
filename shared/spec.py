"""A network as data: a small, versioned, hashable description that travels with the base model.

The engine, the merged predictor, the Skip2 cache, pretraining, ONNX import and export and the
adapters' wire layout are all derived from this one description, so a new model is a new spec,
never new code. A spec is an input shape and a list of blocks, each a list of layers. Block
boundaries are where Skip-LoRA taps the network: the input of every block (the network's input,
then each inner block's output, flattened) feeds an adapter straight into the logits.

Shapes: a vector is `(width,)`; a sequence `(length, channels)` and an image `(height, width,
channels)` inside the engine (channels last, so a convolution's im2col rows and its output need no
transpose). The spec's `input` is written the way data is stored, `(features,)`, `(channels,
length)` or `(channels, height, width)`, and every sample is one flat row of channel-major values
(or, with `channels_last`, of the channels-last values, as a Keras model reads them).

1-D ops (`conv1d`, `depthwise`, `maxpool`) pad to keep the length ("same", odd kernels) and have
stride 1; their pooling has stride equal to its size. 2-D ops (`conv2d`, `maxpool2d`,
`avgpool2d`) take a `window` (kernel height, width), a `stride` and explicit `pads` (top, left,
bottom, right, as ONNX writes them); `conv2d` takes `groups` (groups == channels: depthwise). A
`residual` layer's output is its `branch` applied to its input plus its `shortcut` (the input
itself when empty). Weights are 2-D, `(fan_in, out)`: a convolution's im2col column is
`c * kernel + j` (1-D) or `c * kh * kw + i * kw + j` (2-D; c within the group), and a layer's arrays
are named after its index k among the weighted layers, counted in placement order (a residual's
branch, then its shortcut): `W{k}`, `b{k}`, and `gamma{k}`, `beta{k}`, `mean{k}`, `var{k}` for the
batch norm right after it.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, fields

from skip2fleet.shared.errors import FleetError

SPEC_VERSION = 1
WEIGHTED = ("linear", "conv1d", "depthwise", "conv2d")
POOLS_2D = ("maxpool2d", "avgpool2d")
OPS = (
    *WEIGHTED,
    "batchnorm",
    "relu",
    "relu6",
    "maxpool",
    *POOLS_2D,
    "gap",
    "flatten",
    "residual",
)
ALWAYS_WRITTEN = ("op", "out", "kernel")  # the fields of a 1-D spec as first stored (its hash)


@dataclass(frozen=True)
class Layer:
    op: str  # one of OPS
    out: int = 0  # linear, conv1d, conv2d: output width or channels
    kernel: int = 0  # conv1d, depthwise: kernel size; maxpool: pool size
    window: tuple[int, int] = (0, 0)  # conv2d, maxpool2d, avgpool2d: kernel height and width
    stride: tuple[int, int] = (1, 1)  # 2-D ops
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # 2-D ops: top, left, bottom, right
    groups: int = 1  # conv2d
    branch: tuple[Layer, ...] = ()  # residual
    shortcut: tuple[Layer, ...] = ()  # residual: empty means the input itself

    def to_dict(self) -> dict:
        """The fields a stored spec holds: the first three always (a 1-D spec stores the same
        bytes as before 2-D ops existed), any other only when it is not its default."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ALWAYS_WRITTEN or value != f.default:
                nested = f.name in ("branch", "shortcut")
                out[f.name] = [layer.to_dict() for layer in value] if nested else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Layer:
        values = dict(data)
        for name in ("branch", "shortcut"):
            values[name] = tuple(cls.from_dict(d) for d in values.get(name, ()))
        for name in ("window", "stride", "pads"):
            if name in values:
                values[name] = tuple(int(v) for v in values[name])
        return cls(**values)


@dataclass(frozen=True)
class Placed:
    """A layer where it sits: its block, its shapes, the index k of its weighted layer, and, inside
    a residual, the index (in `Spec.placed()`) of that residual and which of its paths."""

    layer: Layer
    block: int
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    k: int  # this layer's weight index (weighted layers), or the one it follows (batch norm)
    parent: int = -1  # the residual it belongs to; -1 at the top level of its block
    part: str = ""  # "branch" or "shortcut" inside a residual

    @property
    def weight_shape(self) -> tuple[int, int]:
        layer, shape = self.layer, self.shape_in
        if layer.op == "linear":
            return (shape[0], layer.out)
        if layer.op == "conv1d":
            return (shape[1] * layer.kernel, layer.out)
        if layer.op == "conv2d":
            return (shape[2] // layer.groups * layer.window[0] * layer.window[1], layer.out)
        return (layer.kernel, shape[1])  # depthwise: one kernel per channel

    @property
    def adaptable(self) -> bool:
        """Whether a LoRA or DoRA adapter may sit beside it: not on a depthwise or grouped
        convolution, where even rank 1 (A: C x r convolution with the kernel, B: r x C) outgrows
        the layer's C x k."""
        return self.layer.op in ("linear", "conv1d") or (
            self.layer.op == "conv2d" and self.layer.groups == 1
        )


@dataclass(frozen=True)
class Spec:
    input: tuple[int, ...]  # (features,), (channels, length) or (channels, height, width)
    blocks: tuple[tuple[Layer, ...], ...]
    version: int = SPEC_VERSION
    channels_last: bool = False  # a sample row holds the input channels last

    def to_json(self) -> str:
        data = {
            "blocks": [[layer.to_dict() for layer in block] for block in self.blocks],
            "input": list(self.input),
            "version": self.version,
        }
        if self.channels_last:
            data["channels_last"] = True
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        try:
            data = json.loads(text)
            if data["version"] != SPEC_VERSION:
                raise FleetError(f"model spec version {data['version']}, expected {SPEC_VERSION}")
            blocks = tuple(tuple(Layer.from_dict(d) for d in block) for block in data["blocks"])
            spec = cls(tuple(data["input"]), blocks, channels_last=data.get("channels_last", False))
        except (ValueError, KeyError, TypeError) as exc:
            raise FleetError(f"not a model spec ({exc})") from None
        spec.placed()  # validates
        return spec

    @property
    def width(self) -> int:
        """Values per sample (a flat row)."""
        return int(_product(self.input))

    @property
    def engine_input(self) -> tuple[int, ...]:
        """The input's shape inside the engine: channels last."""
        return (*self.input[1:], self.input[0]) if len(self.input) > 1 else tuple(self.input)

    def placed(self) -> list[Placed]:
        """Every layer with its shapes and weight index, a residual before the layers of its
        paths; raises on a spec that does not chain."""
        if not 1 <= len(self.input) <= 3 or min(self.input, default=0) < 1:
            raise FleetError(f"input shape {self.input}: expected 1 to 3 positive sizes")
        placer = _Placer()
        shape, previous = self.engine_input, None
        for block_index, block in enumerate(self.blocks):
            shape, previous = placer.sequence(block, shape, block_index, -1, "", previous)
        if len(shape) != 1 or placer.k < 0:
            raise FleetError("a model must end in a vector of logits after a weighted layer")
        return placer.placed

    @property
    def n_classes(self) -> int:
        return self.placed()[-1].shape_out[0] if self.blocks else 0

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


class _Placer:
    """Walks the layers in placement order, numbering weighted layers and checking shapes."""

    def __init__(self) -> None:
        self.k, self.placed = -1, []

    def sequence(self, layers, shape, block: int, parent: int, part: str, previous):
        for layer in layers:
            if layer.op not in OPS:
                raise FleetError(f"unknown layer {layer.op!r}; choose from {', '.join(OPS)}")
            if layer.op == "batchnorm" and previous not in WEIGHTED:
                raise FleetError("a batch norm must follow a linear or convolution layer")
            if layer.op in WEIGHTED:
                self.k += 1
            if layer.op == "residual":
                shape = self.residual(layer, shape, block, parent, part)
            else:
                out = _shape_out(layer, shape)
                self.placed.append(Placed(layer, block, shape, out, self.k, parent, part))
                shape = out
            previous = layer.op
        return shape, previous

    def residual(self, layer: Layer, shape, block: int, parent: int, part: str):
        if not layer.branch:
            raise FleetError("a residual needs a branch of layers")
        index = len(self.placed)
        self.placed.append(None)  # the residual itself, placed once its paths' shapes are known
        out, _ = self.sequence(layer.branch, shape, block, index, "branch", None)
        other, _ = self.sequence(layer.shortcut, shape, block, index, "shortcut", None)
        if out != other:
            raise FleetError(f"a residual adds its branch {out} to its shortcut {other}")
        self.placed[index] = Placed(layer, block, shape, out, self.k, parent, part)
        return out


def _product(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def pooled_size(size: int, kernel: int, stride: int, before: int, after: int) -> int:
    """An output side of a 2-D convolution or pooling (no dilation, floor)."""
    return (size + before + after - kernel) // stride + 1


def _shape_out(layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    op = layer.op
    if op in ("batchnorm", "relu", "relu6"):
        return shape
    if op == "linear":
        if len(shape) != 1:
            raise FleetError("linear takes a vector; add gap or flatten before it")
        return (layer.out,)
    if op == "gap":
        if len(shape) == 1:
            raise FleetError("gap takes a sequence or an image")
        return (shape[-1],)
    if op == "flatten":
        return (_product(shape),)
    if op in ("conv2d", *POOLS_2D):
        return _shape_2d(layer, shape)
    if len(shape) != 2:
        raise FleetError(f"{op} takes a sequence (length, channels)")
    if op in ("conv1d", "depthwise") and layer.kernel % 2 == 0:
        raise FleetError(f"{op}: kernel must be odd (same padding)")
    if op == "conv1d":
        return (shape[0], layer.out)
    if op == "depthwise":
        return shape
    if layer.kernel < 1 or shape[0] // layer.kernel < 1:  # maxpool
        raise FleetError(f"maxpool {layer.kernel} does not fit length {shape[0]}")
    return (shape[0] // layer.kernel, shape[1])


def _shape_2d(layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    op, (kh, kw), (sh, sw), pads = layer.op, layer.window, layer.stride, layer.pads
    if len(shape) != 3:
        raise FleetError(f"{op} takes an image (height, width, channels)")
    if (
        min(kh, kw, sh, sw) < 1
        or min(pads) < 0
        or max(pads[0], pads[2]) >= kh
        or max(pads[1], pads[3]) >= kw
    ):
        raise FleetError(f"{op}: window {layer.window}, stride {layer.stride}, pads {pads}")
    if op == "avgpool2d" and any(pads):
        raise FleetError("avgpool2d: no padding")
    height = pooled_size(shape[0], kh, sh, pads[0], pads[2])
    width = pooled_size(shape[1], kw, sw, pads[1], pads[3])
    if height < 1 or width < 1:
        raise FleetError(f"{op} window {layer.window} does not fit {shape[0]} x {shape[1]}")
    if op != "conv2d":
        return (height, width, shape[2])
    groups = layer.groups
    if layer.out < 1 or groups < 1 or shape[2] % groups or layer.out % groups:
        raise FleetError(f"conv2d: {shape[2]} channels to {layer.out} in {groups} groups")
    return (height, width, layer.out)


def describe(spec: Spec) -> str:
    """A short human description: the layers' ops and widths, and the parameter count."""
    count = sum(
        int(_product(shape))
        for name, shape in spec.array_shapes().items()
        if not name.startswith(("in_", "mean", "var"))
    )
    shape = "x".join(map(str, spec.input))
    return f"{shape} -> {' '.join(_words(spec.placed()))} ({count} parameters)"


def _words(placed: list[Placed]) -> list[str]:
    parts = []
    for p in placed:
        op = p.layer.op
        if op in WEIGHTED:
            size = p.layer.kernel or ("x".join(map(str, p.layer.window)) if op == "conv2d" else "")
            groups = f"/g{p.layer.groups}" if p.layer.groups > 1 else ""
            parts.append(f"{op}{size}{groups}:{p.shape_out[-1]}")
        elif op not in ("batchnorm", "relu", "relu6"):
            parts.append(op)
    return parts


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


KERNEL_2D = (3, 3)
SAME_2D = (1, 1, 1, 1)  # the pads that keep a 3 x 3 convolution's size
POOL_2D = Layer("maxpool2d", window=(2, 2), stride=(2, 2))


def _conv2d(out: int, groups: int = 1, stride: int = 1) -> tuple[Layer, ...]:
    """A 3 x 3 convolution (same padding at stride 1) and its batch norm."""
    strides = (stride, stride)
    conv = Layer("conv2d", out, window=KERNEL_2D, stride=strides, pads=SAME_2D, groups=groups)
    return (conv, Layer("batchnorm"))


def _pointwise(out: int, stride: int = 1) -> tuple[Layer, ...]:
    return (Layer("conv2d", out, window=(1, 1), stride=(stride, stride)), Layer("batchnorm"))


def cnn2d(channels: int, height: int, width: int, n_classes: int, widths=CNN_WIDTHS) -> Spec:
    """The CNN in 2-D: blocks of conv 3x3 -> batch norm -> ReLU -> max pool 2x2, global average
    pool, linear head (Skip2-LoRA's CNN extension is a small image CNN of this shape)."""
    blocks = tuple((*_conv2d(w), Layer("relu"), POOL_2D) for w in widths)
    return Spec((channels, height, width), (*blocks, _head(n_classes)))


def dscnn2d(channels: int, height: int, width: int, n_classes: int, widths=CNN_WIDTHS) -> Spec:
    """The keyword-spotting DS-CNN's shape (Zhang et al., "Hello Edge"): a plain 3x3 conv, then
    depthwise-separable blocks (depthwise 3x3 -> BN -> ReLU -> pointwise -> BN -> ReLU), each
    block pooled 2x2 as the 1-D `dscnn` is."""
    first = (*_conv2d(widths[0]), Layer("relu"), POOL_2D)
    blocks = tuple(
        (*_conv2d(previous, groups=previous), Layer("relu"), *_pointwise(w), Layer("relu"), POOL_2D)
        for previous, w in itertools.pairwise(widths)
    )
    return Spec((channels, height, width), (first, *blocks, _head(n_classes)))


def resnet2d(channels: int, height: int, width: int, n_classes: int, widths=(16, 32)) -> Spec:
    """A small ResNet: a 3x3 stem pooled 2x2, a residual block of two 3x3 convs on an identity
    shortcut, and a downsampling one (stride 2, a 1x1 projection on the shortcut), each followed
    by a ReLU (ResNet-18's basic blocks, two of them)."""
    stem = (*_conv2d(widths[0]), Layer("relu"), POOL_2D)
    same = (*_conv2d(widths[0]), Layer("relu"), *_conv2d(widths[0]))
    down = (*_conv2d(widths[1], stride=2), Layer("relu"), *_conv2d(widths[1]))
    blocks = (
        stem,
        (Layer("residual", branch=same), Layer("relu")),
        (Layer("residual", branch=down, shortcut=_pointwise(widths[1], 2)), Layer("relu")),
    )
    return Spec((channels, height, width), (*blocks, _head(n_classes)))


MODELS = ("mlp", "cnn", "dscnn", "cnn2d", "dscnn2d", "resnet2d")
BUILDERS = {"cnn": cnn, "dscnn": dscnn, "cnn2d": cnn2d, "dscnn2d": dscnn2d, "resnet2d": resnet2d}
FORM_OF_RANK = {1: "features", 2: "windows", 3: "images"}


def input_form(name: str) -> str:
    """The data form (`shared.datasets.FORMS`) a built-in model reads."""
    if name == "mlp":
        return "features"
    return "images" if name.endswith("2d") else "windows"


def form_of(spec: Spec) -> str:
    """The data form a spec reads: features, (channels, length) windows or (channels, height,
    width) images."""
    return FORM_OF_RANK[len(spec.input)]


def build(name: str, shape: tuple[int, ...], n_classes: int) -> Spec:
    """The built-in model `name` for samples of `shape` ((features,), (channels, length) or
    (channels, height, width))."""
    if name == "mlp":
        return mlp(int(_product(shape)), n_classes)
    if name not in MODELS:
        raise FleetError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    form = input_form(name)
    if FORM_OF_RANK.get(len(shape)) != form:
        raise FleetError(f"model {name} takes {form}, the data is {shape}")
    return BUILDERS[name](*shape, n_classes)
