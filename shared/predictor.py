"""A fine-tuned network merged for inference: what a device runs to classify new samples.

Merging keeps prediction as cheap as the base network's whatever the method: LoRA and DoRA are
merged into their weights (by the adapters themselves), frozen batch norm is folded into the
weighted layer before it, and each skip adapter becomes one matrix from its tap into the logits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from skip2fleet.shared.flops import matmul
from skip2fleet.shared.network import BN_EPS, ROWS_PER_PASS, Arrays, Network
from skip2fleet.shared.spec import Layer, Spec


def fold_batchnorm(spec: Spec, arrays: Arrays) -> tuple[Spec, Arrays]:
    """The same function without batch norm layers: each one's inference-mode scale and shift
    folded into the output columns of the weighted layer before it."""
    folded = dict(arrays)
    for p in spec.placed():
        if p.layer.op == "batchnorm":
            k = p.k
            scale = arrays[f"gamma{k}"] / np.sqrt(arrays[f"var{k}"] + BN_EPS)
            folded[f"W{k}"] = arrays[f"W{k}"] * scale
            folded[f"b{k}"] = (arrays[f"b{k}"] - arrays[f"mean{k}"]) * scale + arrays[f"beta{k}"]
    blocks = tuple(_without_batchnorm(block) for block in spec.blocks)
    return dataclasses.replace(spec, blocks=blocks), folded


def _without_batchnorm(layers: tuple[Layer, ...]) -> tuple[Layer, ...]:
    return tuple(
        dataclasses.replace(
            layer,
            branch=_without_batchnorm(layer.branch),
            shortcut=_without_batchnorm(layer.shortcut),
        )
        for layer in layers
        if layer.op != "batchnorm"
    )


class Predictor:
    def __init__(
        self, spec: Spec, arrays: Arrays, skips: list[tuple[int, np.ndarray]] | None = None
    ) -> None:
        self.spec, self.arrays = spec, arrays  # as given (ONNX export writes them so)
        folded_spec, folded = fold_batchnorm(spec, arrays)
        self.in_mean, self.in_std = arrays["in_mean"], arrays["in_std"]
        self.dtype = arrays["W0"].dtype
        self.network = Network(folded_spec, folded)
        self.skips = skips or []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits for raw sample rows `x`."""
        x0 = ((x - self.in_mean) / self.in_std).astype(self.dtype)
        rows = ROWS_PER_PASS
        return np.vstack([self._logits(x0[i : i + rows]) for i in range(0, len(x0), rows)])

    def _logits(self, x0: np.ndarray) -> np.ndarray:
        z = self.network.forward(x0, keep_taps=bool(self.skips))
        for tap, matrix in self.skips:
            z += matmul(self.network.taps[tap], matrix)
        return z
