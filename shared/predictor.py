"""A fine-tuned network merged for inference: what a device runs to classify new samples.

Merging keeps prediction as cheap as the base network's whatever the method: LoRA products are
added into their Linear weights, the skip adapter from x2 into the last weight, and the skip
adapters from x0 and x1 become extra output columns of layers 0 and 1 that are summed into the
logits. Input standardisation is folded into the first layer, so raw features go straight in.
"""

from __future__ import annotations

import numpy as np


class Predictor:
    def __init__(
        self,
        in_mean: np.ndarray,
        in_std: np.ndarray,
        layers: list[tuple[np.ndarray, np.ndarray]],
        hidden: tuple[int, int],
    ) -> None:
        (w0, b0), *rest = layers
        w0 = w0 / in_std[:, None]
        self.layers = [(w0, b0 - in_mean @ w0), *rest]
        self.hidden = hidden

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits for raw feature rows `x`."""
        skip = 0.0
        h = x
        for k, (weight, bias) in enumerate(self.layers):
            out = h @ weight
            out += bias
            if k == 2:
                out += skip
                return out
            width = self.hidden[k]
            if out.shape[1] > width:
                skip = skip + out[:, width:]
            h = np.maximum(out[:, :width], 0)
        raise AssertionError("unreachable: the network has three layers")
