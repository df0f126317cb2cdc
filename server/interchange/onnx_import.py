"""`fleet model import`: an ONNX graph of supported operators as a spec and its arrays.

The graph is walked from its one input to its one output. A chain of nodes becomes a chain of
layers; a tensor read by two paths that meet again at an `Add` becomes a `residual` (the longer
path its branch, the other its shortcut, the identity when the `Add` reads the tensor itself). What
each operator maps to (`docs/onnx.md`):

- Gemm, MatMul (+ Add of a constant bias) -> linear; Conv -> conv2d (stride, pads, groups), or in
  1-D conv1d / depthwise when it keeps the length; BatchNormalization -> batchnorm (after a
  weighted layer; its epsilon folded into the variance); Relu -> relu; Clip(0, 6) -> relu6;
  MaxPool, AveragePool -> the 2-D pools (1-D: non-overlapping max pooling); GlobalAveragePool or
  ReduceMean over every position -> gap; Flatten, Reshape, Squeeze -> flatten before a Gemm (a
  no-op on a vector; a Reshape's shape may be computed from Shape nodes, as tf2onnx writes it:
  ONNX's shape inference gives its result); Mul and Add of a per-channel constant after a weighted
  layer (Keras' batch norm as tf2onnx writes it) -> a batchnorm of that scale and shift;
- before the first layer: Sub, Div, Mul, Add of constants become the model's input statistics;
  a Transpose from channels-last (what Keras writes) makes the spec read channels-last rows, a
  Reshape only renames the input's shape; Identity and Dropout are skipped; a final Softmax or
  LogSoftmax is dropped (the fleet fine-tunes logits).

ONNX flattens channel-major and the engine channels-last, so a Flatten's next layer gets its
weight rows reordered (unless a Transpose to channels-last came first, as Keras writes it).
Anything else, a dynamic size other than the batch, or an opset outside `OPSETS` is refused with
one line naming the node and the operator; nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from skip2fleet.shared import model as base_model
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.network import BN_EPS
from skip2fleet.shared.spec import WEIGHTED, Layer, Spec

OPSETS = range(11, 23)  # the default domain's versions read (tested: 11, 15, 17, 20)
CLASSES_KEY = "skip2fleet.classes"  # metadata the exporter writes
SKIPPED = ("Identity", "Dropout")
STATISTICS = ("Sub", "Div", "Mul", "Add")
SHAPING = ("Flatten", "Reshape", "Squeeze")
SHAPE_OPS = ("Shape", "Gather", "Cast", "Slice", "Concat", "Unsqueeze", "Squeeze", "Identity")
SUPPORTED = (
    "Gemm, MatMul, Add, Conv, BatchNormalization, Relu, Clip (ReLU6), MaxPool, AveragePool, "
    "GlobalAveragePool, ReduceMean, Flatten, Reshape, Squeeze, Transpose, Sub, Div, Mul, "
    "Identity, Dropout, Softmax, LogSoftmax"
)


def refuse(node, problem: str) -> FleetError:
    return FleetError(f"node {node.name or node.output[0]!r} ({node.op_type}): {problem}")


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class Graph:
    """The graph's nodes, constants and who reads which tensor."""

    def __init__(self, proto) -> None:
        from onnx import numpy_helper, shape_inference

        graph = proto.graph
        try:
            inferred = shape_inference.infer_shapes(proto, data_prop=True).graph
        except Exception:  # onnx's InferenceError and others: sizes are then read from nodes
            inferred = graph
        self.sizes = {}  # tensor -> its sizes without the batch, where inference knows them
        for info in [*inferred.value_info, *inferred.output]:
            dims = info.type.tensor_type.shape.dim[1:]
            if all(d.HasField("dim_value") for d in dims):
                self.sizes[info.name] = tuple(int(d.dim_value) for d in dims)
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.nodes = []
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise refuse(node, f"operator of domain {node.domain!r}; only ONNX's own are read")
            if node.op_type == "Constant":
                value = _attributes(node).get("value")
                if value is None:
                    raise refuse(node, "a constant without a tensor value")
                self.constants[node.output[0]] = numpy_helper.to_array(value)
            else:
                self.nodes.append(node)
        self._drop_shape_computations()
        self.readers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                if name and name not in self.constants:
                    self.readers.setdefault(name, []).append(node)
        inputs = [i for i in graph.input if i.name not in self.constants]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise FleetError(
                f"the graph has {len(inputs)} inputs and {len(graph.output)} outputs; a model "
                "reads one input and writes one output"
            )
        self.input, self.output = inputs[0], graph.output[0].name

    def _drop_shape_computations(self) -> None:
        """Forget the nodes that only compute a Reshape's target from Shape nodes (tf2onnx's
        flatten): they read a tensor's shape, not its values."""
        producer = {out: node for node in self.nodes for out in node.output}
        dropped: set[int] = set()
        for node in self.nodes:
            if node.op_type != "Reshape" or node.input[1] in self.constants:
                continue
            found, stack = [], [node.input[1]]
            while stack:
                source = producer.get(stack.pop())
                if source is None or source.op_type not in SHAPE_OPS:
                    found = []
                    break
                found.append(source)
                if source.op_type != "Shape":
                    stack += [n for n in source.input if n and n not in self.constants]
            dropped |= {id(n) for n in found}
        self.nodes = [node for node in self.nodes if id(node) not in dropped]

    def constant(self, node, index: int, what: str) -> np.ndarray | None:
        """The node's input `index` as a constant array (None when the input is absent)."""
        if index >= len(node.input) or not node.input[index]:
            return None
        name = node.input[index]
        if name not in self.constants:
            raise refuse(node, f"its {what} ({name}) is computed, not a constant")
        return self.constants[name].astype(np.float64)

    def next_of(self, tensor: str) -> list:
        return self.readers.get(tensor, [])


class Importer:
    """Turns the walked nodes into layers and their arrays."""

    def __init__(self, graph: Graph, shape: tuple[int, ...]) -> None:
        self.graph = graph
        self.shape = shape  # the current tensor's shape, channels first, without the batch
        self.input_shape = shape  # what the spec reads: channels first (see channels_last)
        self.channels_last = False
        self.mean = np.zeros(shape)
        self.std = np.ones(shape)
        self.started = False  # a layer has been made: no more input statistics
        self.arrays: dict[int, dict[str, np.ndarray]] = {}  # id(layer) -> its arrays
        self.reorder: np.ndarray | None = None  # rows of the next linear (after a Flatten)

    # -- walking ---------------------------------------------------------------------------

    def walk(self, tensor: str, first=None, stop_at_join: bool = False):
        """Layers from `tensor` on (starting with node `first` when given): until the graph's
        output, or (inside a residual path) until the `Add` where two paths meet. Returns the
        layers, the join reached (or None) and the tensor last produced."""
        layers: list[Layer] = []
        node = first
        while True:
            if node is None:
                readers = self.graph.next_of(tensor)
                if tensor == self.graph.output and not readers:
                    return layers, None, tensor
                if len(readers) == 2:
                    layer, tensor = self.residual(tensor, readers)
                    layers.append(layer)
                    continue
                if len(readers) != 1:
                    where = "the graph's output" if tensor == self.graph.output else tensor
                    raise FleetError(
                        f"tensor {where!r} is read by {len(readers)} nodes; only a residual's two "
                        "paths may share one"
                    )
                node = readers[0]
            if self.is_join(node):
                if stop_at_join:
                    return layers, node, tensor
                raise refuse(node, "adds two computed tensors outside a residual block")
            if node.op_type in ("Softmax", "LogSoftmax"):
                if node.output[0] != self.graph.output or self.graph.next_of(node.output[0]):
                    raise refuse(node, "a softmax before the end; only a final one is dropped")
                return layers, None, tensor
            tensor, made = self.node(node, layers)
            layers += made
            node = None

    def is_join(self, node) -> bool:
        return node.op_type == "Add" and all(
            name not in self.graph.constants for name in node.input
        )

    def residual(self, tensor: str, readers: list) -> tuple[Layer, str]:
        shape, paths = self.shape, []
        for reader in readers:
            self.shape = shape
            if self.is_join(reader):
                paths.append(([], reader, tensor, shape))
            else:
                layers, join, _ = self.walk(tensor, reader, stop_at_join=True)
                paths.append((layers, join, tensor, self.shape))
        (one, join, _, one_shape), (other, join_other, _, other_shape) = paths
        if join is None or join is not join_other:
            raise FleetError(f"tensor {tensor!r} is read by two paths that never add up again")
        if one_shape != other_shape:
            raise refuse(join, f"adds {one_shape} to {other_shape}")
        branch, shortcut = (one, other) if len(one) >= len(other) else (other, one)
        self.shape = one_shape
        return Layer("residual", branch=tuple(branch), shortcut=tuple(shortcut)), join.output[0]

    # -- one node -------------------------------------------------------------------------

    def node(self, node, made_before: list[Layer]) -> tuple[str, list[Layer]]:
        """The tensor a node makes and the layers it maps to."""
        op, attrs = node.op_type, _attributes(node)
        if len(node.output) > 1 and any(node.output[1:]):
            raise refuse(node, "its second output is used; only inference graphs are read")
        out = node.output[0]
        if op in SKIPPED:
            return out, []
        if not self.started and op in STATISTICS:
            self.statistics(node)
            return out, []
        if not self.started and op in ("Transpose", "Reshape"):
            self.input_layout(node, attrs)
            return out, []
        self.started = True
        if op == "Transpose":
            perm = list(attrs.get("perm", []))
            if perm != [0, *range(2, len(self.shape) + 1), 1] or self.reorder is not None:
                raise refuse(node, f"perm {perm}; only channels-last before a flatten is read")
            self.reorder = np.arange(int(np.prod(self.shape)))  # flattened as the engine does
            return out, []
        if op in SHAPING:
            return out, self.flatten(node)
        if op in ("Gemm", "MatMul"):
            return self.linear(node, attrs)
        if op == "Conv":
            return out, [self.conv(node, attrs)]
        if op == "BatchNormalization":
            return out, [self.batchnorm(node, attrs, made_before)]
        if op == "Relu":
            return out, [Layer("relu")]
        if op == "Clip":
            return out, [self.clip(node, attrs)]
        if op in ("MaxPool", "AveragePool"):
            return out, [self.pool(node, attrs)]
        if op in ("GlobalAveragePool", "ReduceMean"):
            return out, [self.global_pool(node, attrs)]
        if op in ("Mul", "Add"):
            return out, self.affine(node, made_before)
        raise refuse(node, f"operator not supported; supported: {SUPPORTED}")

    def statistics(self, node) -> None:
        """Sub, Div, Mul, Add of a constant before any layer: the input statistics."""
        value = self._broadcast(node)
        if node.op_type == "Sub":
            self.mean = self.mean + value * self.std
        elif node.op_type == "Add":
            self.mean = self.mean - value * self.std
        elif node.op_type == "Div":
            self.std = self.std * value
        else:
            self.std = self.std / value
        if not np.all(np.isfinite(self.std)) or np.any(self.std == 0):
            raise refuse(node, "scales the input by zero or a non-finite value")

    def _broadcast(self, node) -> np.ndarray:
        constant = [i for i, name in enumerate(node.input) if name in self.graph.constants]
        either_side = node.op_type in ("Mul", "Add")
        if len(constant) != 1 or not (constant == [1] or either_side):
            raise refuse(node, "the input statistics must be a constant on the right-hand side")
        value = self.graph.constants[node.input[constant[0]]].astype(np.float64)
        batch_shape = (1, *self.shape)
        try:
            value = np.broadcast_to(value, batch_shape)[0]
        except ValueError:
            raise refuse(node, f"a constant of {value.shape} for inputs of {self.shape}") from None
        return value

    def input_layout(self, node, attrs: dict) -> None:
        """A Transpose from channels last, or a Reshape, before the first layer."""
        rank = len(self.shape)
        if node.op_type == "Transpose":
            perm = list(attrs.get("perm", []))
            if rank < 2 or self.channels_last or perm != [0, rank, *range(1, rank)]:
                raise refuse(node, f"perm {perm} of the input; only channels-last to first is read")
            self.channels_last = True
            self.shape = self.input_shape = (self.shape[-1], *self.shape[:-1])
            self.mean = np.moveaxis(self.mean, -1, 0)
            self.std = np.moveaxis(self.std, -1, 0)
            return
        target = self._reshape_target(node)
        if self.channels_last or int(np.prod(target)) != int(np.prod(self.shape)):
            raise refuse(node, f"reshapes the input {self.shape} to {target}")
        self.mean, self.std = self.mean.reshape(target), self.std.reshape(target)
        self.shape = self.input_shape = tuple(target)

    def _reshape_target(self, node) -> tuple[int, ...]:
        if node.input[1] not in self.graph.constants:
            if node.output[0] not in self.graph.sizes:
                raise refuse(node, "a target shape that shape inference cannot tell")
            return self.graph.sizes[node.output[0]]
        target = self.graph.constant(node, 1, "shape")
        size = int(np.prod(self.shape))
        dims = [int(d) for d in target[1:]] if target is not None else []
        if target is None or len(target) < 2 or not 1 <= len(dims) <= 3:
            raise refuse(node, "a reshape to other than (batch, ...) of 1 to 3 sizes")
        dims = [d if d != 0 else self.shape[i] for i, d in enumerate(dims)]
        if -1 in dims:
            known = int(np.prod([d for d in dims if d != -1]))
            dims[dims.index(-1)] = size // max(known, 1)
        return tuple(dims)

    def flatten(self, node) -> list[Layer]:
        """Flatten, Reshape or Squeeze to (batch, values): a flatten (no-op on a vector)."""
        if node.op_type == "Reshape":
            target = self._reshape_target(node)
            if len(target) != 1:
                raise refuse(node, f"reshapes {self.shape} to {target}; only a flatten is read")
        elif node.op_type == "Flatten" and _attributes(node).get("axis", 1) != 1:
            raise refuse(node, "flattens from another axis than 1")
        elif node.op_type == "Squeeze" and int(np.prod(self.shape[1:] or (1,))) != 1:
            raise refuse(node, f"squeezes {self.shape}, which is not a vector")
        if len(self.shape) == 1:
            return []
        if self.reorder is None:  # ONNX's flatten is channel-major, the engine's channels-last
            positions = np.arange(int(np.prod(self.shape))).reshape(self.shape)
            self.reorder = np.moveaxis(positions, 0, -1).ravel()
        self.shape = (int(np.prod(self.shape)),)
        return [Layer("flatten")]

    def global_pool(self, node, attrs: dict) -> Layer:
        rank = len(self.shape) + 1
        if rank < 3:
            raise refuse(node, "pools a vector")
        if node.op_type == "ReduceMean":
            axes = attrs.get("axes")
            axes = self.graph.constant(node, 1, "axes") if axes is None else axes
            if axes is None or sorted(int(a) % rank for a in axes) != list(range(2, rank)):
                raise refuse(node, "a mean over other axes than every position")
        self.shape = (self.shape[0],)
        return Layer("gap")

    def affine(self, node, made_before: list[Layer]) -> list[Layer]:
        """Mul or Add of a per-channel constant right after a weighted layer or a batch norm:
        a batch norm of that scale (mean 0, variance 1), or a shift of the bias before it."""
        value = self._broadcast(node)
        per_channel = value.reshape(len(value), -1)
        if not np.all(per_channel == per_channel[:, :1]):
            raise refuse(node, "a constant that differs along positions, not per channel")
        value = per_channel[:, 0]
        previous = made_before[-1] if made_before else None
        arrays = self.arrays.get(id(previous)) if previous is not None else None
        if previous is None or previous.op not in (*WEIGHTED, "batchnorm"):
            raise refuse(node, "a constant scale or shift must follow a weighted layer")
        if previous.op == "batchnorm" and node.op_type == "Mul":
            arrays["gamma"], arrays["beta"] = arrays["gamma"] * value, arrays["beta"] * value
        elif node.op_type == "Add":
            arrays["beta" if previous.op == "batchnorm" else "b"] += value
        else:
            layer = Layer("batchnorm")
            self.arrays[id(layer)] = {
                "gamma": value,
                "beta": np.zeros_like(value),
                "mean": np.zeros_like(value),
                "var": np.full_like(value, 1 - BN_EPS),
            }
            return [layer]
        return []

    # -- weighted layers ---------------------------------------------------------------------

    def linear(self, node, attrs: dict) -> tuple[str, list[Layer]]:
        if len(self.shape) != 1:
            raise refuse(node, f"reads a {self.shape} map; flatten or pool it first")
        out = node.output[0]
        if node.op_type == "Gemm":
            if attrs.get("transA", 0):
                raise refuse(node, "transA; the input must be (batch, features)")
            weight = self.graph.constant(node, 1, "weight")
            weight = weight.T if attrs.get("transB", 0) else weight
            weight = weight * attrs.get("alpha", 1.0)
            bias = self.graph.constant(node, 2, "bias")
            bias = np.zeros(weight.shape[1]) if bias is None else bias * attrs.get("beta", 1.0)
        else:
            weight = self.graph.constant(node, 1, "weight")
            bias = np.zeros(weight.shape[-1])
            readers = self.graph.next_of(out)
            if len(readers) == 1 and readers[0].op_type == "Add" and not self.is_join(readers[0]):
                add = readers[0]
                bias = next(
                    self.graph.constants[n] for n in add.input if n in self.graph.constants
                ).astype(np.float64)
                out = add.output[0]
        if weight.ndim != 2 or weight.shape[0] != self.shape[0]:
            raise refuse(node, f"a weight of {weight.shape} for {self.shape[0]} inputs")
        try:
            bias = np.broadcast_to(bias, (weight.shape[1],)).copy()
        except ValueError:
            raise refuse(node, f"a bias of {bias.shape} for {weight.shape[1]} outputs") from None
        if self.reorder is not None:
            weight, self.reorder = weight[self.reorder], None
        layer = Layer("linear", weight.shape[1])
        self.arrays[id(layer)] = {"W": weight, "b": bias}
        self.shape = (weight.shape[1],)
        return out, [layer]

    def conv(self, node, attrs: dict) -> Layer:
        weight = self.graph.constant(node, 1, "weight")
        bias = self.graph.constant(node, 2, "bias")
        rank = weight.ndim - 2
        if rank not in (1, 2) or len(self.shape) != rank + 1:
            raise refuse(node, f"a {rank}-D kernel on a {self.shape} input")
        out, per_group = weight.shape[0], weight.shape[1]
        groups = int(attrs.get("group", 1))
        kernel = tuple(weight.shape[2:])
        strides = tuple(attrs.get("strides", (1,) * rank))
        if any(d != 1 for d in attrs.get("dilations", (1,) * rank)):
            raise refuse(node, f"dilations {list(attrs['dilations'])}; only 1 is read")
        pads = self._pads(node, attrs, kernel, strides)
        channels = self.shape[0]
        if per_group * groups != channels:
            raise refuse(node, f"{per_group} x {groups} groups for {channels} channels")
        bias = np.zeros(out) if bias is None else bias
        if rank == 1:
            layer, w = self._conv1d(node, weight, kernel[0], strides[0], pads, groups)
        else:
            layer = Layer("conv2d", out, window=kernel, stride=strides, pads=pads, groups=groups)
            w = weight.reshape(out, -1).T
            size = [
                (self.shape[1 + i] + pads[i] + pads[i + 2] - kernel[i]) // strides[i] + 1
                for i in range(2)
            ]
            self.shape = (out, *size)
        self.arrays[id(layer)] = {"W": w, "b": bias}
        return layer

    def _conv1d(self, node, weight, kernel: int, stride: int, pads, groups: int):
        channels, out = self.shape[0], weight.shape[0]
        same = stride == 1 and kernel % 2 == 1 and tuple(pads) == (kernel // 2,) * 2
        self.shape = (out, self.shape[1])
        if same and groups == 1:
            return Layer("conv1d", out, kernel), weight.reshape(out, -1).T
        if same and groups == channels == out:
            return Layer("depthwise", 0, kernel), weight.reshape(out, kernel).T
        raise refuse(
            node,
            f"a 1-D convolution of stride {stride}, pads {list(pads)}, {groups} groups; in 1-D "
            "only length-keeping ones are read (stride 1, odd kernel k, pads k//2, one group or "
            "one per channel)",
        )

    def _pads(self, node, attrs: dict, kernel, strides) -> tuple[int, ...]:
        """Explicit pads (begin..., end...), from auto_pad when it is set."""
        rank = len(kernel)
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("NOTSET", ""):
            return tuple(int(p) for p in attrs.get("pads", (0,) * (2 * rank)))
        if auto == "VALID":
            return (0,) * (2 * rank)
        begin, end = [], []
        for size, k, s in zip(self.shape[1:], kernel, strides, strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else large)
            end.append(large if auto == "SAME_UPPER" else small)
        return (*begin, *end)

    def batchnorm(self, node, attrs: dict, made_before: list[Layer]) -> Layer:
        if attrs.get("training_mode", 0):
            raise refuse(node, "training mode; only inference graphs are read")
        if not made_before or made_before[-1].op not in WEIGHTED:
            raise refuse(node, "a batch norm must follow a Conv, Gemm or MatMul")
        scale, shift, mean, var = (
            self.graph.constant(node, i, what)
            for i, what in enumerate(("scale", "bias", "mean", "variance"), start=1)
        )
        epsilon = attrs.get("epsilon", 1e-5)
        layer = Layer("batchnorm")
        self.arrays[id(layer)] = {
            "gamma": scale,
            "beta": shift,
            "mean": mean,
            "var": var + epsilon - BN_EPS,  # the same sqrt(var + epsilon) with our epsilon
        }
        return layer

    def clip(self, node, attrs: dict) -> Layer:
        low = self.graph.constant(node, 1, "minimum")
        high = self.graph.constant(node, 2, "maximum")
        low = attrs.get("min", -np.inf) if low is None else float(low)
        high = attrs.get("max", np.inf) if high is None else float(high)
        if low == 0 and high == 6:
            return Layer("relu6")
        if low == 0 and high == np.inf:
            return Layer("relu")
        raise refuse(node, f"clips to [{low}, {high}]; only ReLU6 (0, 6) or ReLU is read")

    def pool(self, node, attrs: dict) -> Layer:
        kernel = tuple(attrs.get("kernel_shape", ()))
        rank = len(kernel)
        strides = tuple(attrs.get("strides", (1,) * rank))
        if attrs.get("ceil_mode", 0) or any(d != 1 for d in attrs.get("dilations", (1,) * rank)):
            raise refuse(node, "ceil mode or dilations; only floor and no dilation are read")
        if len(self.shape) != rank + 1:
            raise refuse(node, f"a {rank}-D window on a {self.shape} input")
        pads = self._pads(node, attrs, kernel, strides)
        if rank == 1:
            if node.op_type != "MaxPool" or strides != kernel or any(pads):
                raise refuse(node, "in 1-D only max pooling with stride = size, unpadded, is read")
            self.shape = (self.shape[0], self.shape[1] // kernel[0])
            return Layer("maxpool", 0, kernel[0])
        if node.op_type == "AveragePool" and any(pads):
            raise refuse(node, "padded average pooling; pad with a layer of its own")
        op = "maxpool2d" if node.op_type == "MaxPool" else "avgpool2d"
        size = [
            (self.shape[1 + i] + pads[i] + pads[i + 2] - kernel[i]) // strides[i] + 1
            for i in range(2)
        ]
        self.shape = (self.shape[0], *size)
        return Layer(op, window=kernel, stride=strides, pads=pads)

    # -- the spec ------------------------------------------------------------------------

    def spec_and_arrays(self, layers: list[Layer]) -> tuple[Spec, dict[str, np.ndarray]]:
        blocks: list[list[Layer]] = []
        for layer in layers:
            head = blocks and blocks[-1] and blocks[-1][-1].op in ("gap", "flatten")
            opens = layer.op in (*WEIGHTED, "residual", "gap", "flatten") and not (
                head and layer.op == "linear"
            )
            if not blocks or (opens and blocks[-1]):
                blocks.append([])
            blocks[-1].append(layer)
        spec = Spec(
            self.input_shape,
            tuple(tuple(block) for block in blocks),
            channels_last=self.channels_last,
        )
        arrays: dict[str, np.ndarray] = {}
        for p in spec.placed():
            for name, value in self.arrays.get(id(p.layer), {}).items():
                arrays[f"{name}{p.k}"] = value.astype(np.float32)
        raw = (lambda a: np.moveaxis(a, 0, -1)) if self.channels_last else (lambda a: a)
        arrays["in_mean"] = raw(self.mean).ravel().astype(np.float32)
        arrays["in_std"] = raw(self.std).ravel().astype(np.float32)
        return spec, arrays


def _input_shape(graph: Graph) -> tuple[int, ...]:
    dims = graph.input.type.tensor_type.shape.dim
    sizes = []
    for index, dim in enumerate(dims[1:], start=1):
        if not dim.HasField("dim_value") or dim.dim_value < 1:
            label = dim.dim_param or "unknown"
            raise FleetError(
                f"input {graph.input.name!r} has a dynamic size {label!r} at axis {index}; a "
                "model takes samples of fixed sizes (only the batch may vary)"
            )
        sizes.append(int(dim.dim_value))
    if not 1 <= len(sizes) <= 3:
        raise FleetError(
            f"input {graph.input.name!r} has {len(dims)} axes; a model reads (batch, features), "
            "(batch, channels, length) or (batch, channels, height, width)"
        )
    return tuple(sizes)


def read_onnx(path: Path):
    """The ModelProto in `path`, its opset checked."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FleetError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and onnx's own: any means unreadable
        raise FleetError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    versions = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    version = versions.get("ai.onnx")
    if version not in OPSETS:
        raise FleetError(
            f"{path}: opset {version}; this reads opsets {OPSETS.start} to {OPSETS.stop - 1}"
        )
    return proto


def import_onnx(path: Path, classes: Sequence[str] | None = None) -> base_model.Model:
    """The base model an ONNX file describes, with `classes` (else the names the file carries,
    else the output's indices)."""
    proto = read_onnx(path)
    graph = Graph(proto)
    importer = Importer(graph, _input_shape(graph))
    try:
        layers, _, _ = importer.walk(graph.input.name)
        spec, arrays = importer.spec_and_arrays(layers)
        model = {**arrays, base_model.SPEC_KEY: base_model.spec_array(spec)}
        for name, shape in spec.array_shapes().items():
            if model[name].shape != shape:
                raise FleetError(f"array {name} of {model[name].shape}, expected {shape}")
    except FleetError as exc:
        raise FleetError(f"{path}: {exc}") from None
    if not all(np.all(np.isfinite(a)) for name, a in model.items() if name != "spec"):
        raise FleetError(f"{path}: a weight holds NaN or Inf")
    carried = {p.key: p.value for p in proto.metadata_props}.get(CLASSES_KEY)
    names = list(classes or (json.loads(carried) if carried else []))
    n_classes = spec.n_classes
    if classes and len(names) != n_classes:
        raise FleetError(f"--classes names {len(names)} classes; the model has {n_classes} outputs")
    return base_model.with_classes(model, names or [str(i) for i in range(n_classes)])
