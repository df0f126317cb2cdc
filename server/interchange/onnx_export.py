"""`fleet model export`: a model of any spec as an ONNX graph, for onnxruntime or any runtime.

What is written is what a device predicts with (`shared.predictor.Predictor`): the base with
LoRA and DoRA merged into its weights, batch norm as BatchNormalization nodes, and each of
Skip2-LoRA's skip adapters as one more product, from its tap (the block's input, flattened
channels-last as the engine lays it out) straight into the logits. The input takes the spec's raw
rows in their shape, `(batch, *input)` (channels last when the spec reads them so), and the
model's input statistics as a Sub and a Div (none when they are 0 and 1, as after an import);
the output is the logits. Opset `OPSET`; the class names travel as metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from skip2fleet.server.interchange.onnx_import import CLASSES_KEY
from skip2fleet.shared.atomic import write_atomic
from skip2fleet.shared.network import BN_EPS
from skip2fleet.shared.predictor import Predictor
from skip2fleet.shared.spec import Layer, Spec

OPSET = 17
PRODUCER = "skip2fleet"


class Builder:
    """Nodes and constants of the graph being written, with names made unique."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays, self.nodes, self.constants, self.count = arrays, [], [], 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def constant(self, stem: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        dtype = np.int64 if np.asarray(value).dtype.kind in "iu" else np.float32
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op: str, inputs: list[str], **attributes) -> str:
        from onnx import helper

        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attributes))
        return out

    def channels_last_flat(self, tensor: str, rank: int) -> str:
        """A (batch, C, ...) tensor flattened as the engine flattens: channels last."""
        if rank > 1:
            tensor = self.node("Transpose", [tensor], perm=[0, *range(2, rank + 1), 1])
        return self.node("Flatten", [tensor], axis=1)


def _ints(values) -> list[int]:
    return [int(v) for v in values]


class Writer:
    def __init__(self, spec: Spec, arrays: dict[str, np.ndarray]) -> None:
        self.spec, self.b = spec, Builder(arrays)
        self.placed = iter(spec.placed())

    def layers(self, layers, tensor: str) -> str:
        for _ in layers:
            tensor = self.layer(next(self.placed), tensor)
        return tensor

    def layer(self, p, tensor: str) -> str:
        b, layer, op, k = self.b, p.layer, p.layer.op, p.k
        W = b.arrays.get(f"W{k}")
        bias = b.arrays.get(f"b{k}")
        rank = len(p.shape_in)
        if op == "linear":
            return b.node("Gemm", [tensor, b.constant("W", W), b.constant("b", bias)])
        if op == "conv1d":
            weight = W.T.reshape(layer.out, -1, layer.kernel)
            return self._conv(tensor, weight, bias, pads=[layer.kernel // 2] * 2)
        if op == "depthwise":
            weight = W.T.reshape(-1, 1, layer.kernel)
            pads = [layer.kernel // 2] * 2
            return self._conv(tensor, weight, bias, pads=pads, group=weight.shape[0])
        if op == "conv2d":
            weight = W.T.reshape(layer.out, -1, *layer.window)
            return self._conv(
                tensor, weight, bias, _ints(layer.pads), _ints(layer.stride), layer.groups
            )
        if op == "batchnorm":
            names = [b.constant(n, b.arrays[f"{n}{k}"]) for n in ("gamma", "beta", "mean", "var")]
            return b.node("BatchNormalization", [tensor, *names], epsilon=BN_EPS)
        if op == "relu":
            return b.node("Relu", [tensor])
        if op == "relu6":
            low, high = b.constant("low", np.float32(0)), b.constant("high", np.float32(6))
            return b.node("Clip", [tensor, low, high])
        if op == "maxpool":
            return b.node("MaxPool", [tensor], kernel_shape=[layer.kernel], strides=[layer.kernel])
        if op in ("maxpool2d", "avgpool2d"):
            attributes = {"kernel_shape": _ints(layer.window), "strides": _ints(layer.stride)}
            if op == "maxpool2d":
                return b.node("MaxPool", [tensor], pads=_ints(layer.pads), **attributes)
            return b.node("AveragePool", [tensor], **attributes)
        if op == "gap":
            return b.node("Flatten", [b.node("GlobalAveragePool", [tensor])], axis=1)
        if op == "flatten":
            return b.channels_last_flat(tensor, rank)
        return self._residual(layer, tensor)

    def _conv(self, tensor, weight, bias, pads, strides=None, group: int = 1) -> str:
        attributes = {"pads": _ints(pads), "group": int(group)}
        if strides is not None:
            attributes["strides"] = strides
        inputs = [tensor, self.b.constant("W", weight), self.b.constant("b", bias)]
        return self.b.node("Conv", inputs, **attributes)

    def _residual(self, layer: Layer, tensor: str) -> str:
        branch = self.layers(layer.branch, tensor)
        shortcut = self.layers(layer.shortcut, tensor)
        return self.b.node("Add", [branch, shortcut])


def to_onnx(predictor: Predictor, classes: list[str] | None = None):
    """The ModelProto of what `predictor` computes."""
    from onnx import TensorProto, checker, helper

    spec, arrays = predictor.spec, predictor.arrays
    writer = Writer(spec, arrays)
    b = writer.b
    rows = spec.engine_input if spec.channels_last else tuple(spec.input)
    tensor = "input"
    mean = np.asarray(arrays["in_mean"], np.float32).reshape(rows)
    std = np.asarray(arrays["in_std"], np.float32).reshape(rows)
    if np.any(mean != 0):
        tensor = b.node("Sub", [tensor, b.constant("in_mean", mean[None])])
    if np.any(std != 1):
        tensor = b.node("Div", [tensor, b.constant("in_std", std[None])])
    taps = [b.node("Flatten", [tensor], axis=1)] if predictor.skips else []
    if spec.channels_last and len(rows) > 1:
        tensor = b.node("Transpose", [tensor], perm=[0, len(rows), *range(1, len(rows))])
    placed = spec.placed()
    for index, block in enumerate(spec.blocks):
        if index and predictor.skips:
            first = next(p for p in placed if p.block == index)
            taps.append(b.channels_last_flat(tensor, len(first.shape_in)))
        tensor = writer.layers(block, tensor)
    for tap, matrix in predictor.skips:
        product = b.node("MatMul", [taps[tap], b.constant("skip", matrix)])
        tensor = b.node("Add", [tensor, product])
    b.nodes.append(helper.make_node("Identity", [tensor], ["logits"], name="logits"))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *rows])]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", spec.n_classes])
    ]
    graph = helper.make_graph(b.nodes, "skip2fleet", inputs, outputs, b.constants)
    proto = helper.make_model(
        graph, producer_name=PRODUCER, opset_imports=[helper.make_opsetid("", OPSET)]
    )
    proto.ir_version = 8  # read by onnxruntime releases from 1.13 on
    if classes:
        helper.set_model_props(proto, {CLASSES_KEY: json.dumps(list(classes))})
    checker.check_model(proto)
    return proto


def export_onnx(predictor: Predictor, path: Path, classes: list[str] | None = None) -> int:
    """Write the graph atomically; returns its size in bytes."""
    data = to_onnx(predictor, classes).SerializeToString()
    write_atomic(Path(path), lambda handle: handle.write(data))
    return len(data)
