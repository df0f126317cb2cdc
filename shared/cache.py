"""The Skip2-LoRA forward cache.

With the base frozen and batch norm in inference mode, a sample's skip taps (every block's input)
and base logits never change during fine-tuning. One pass of the frozen base stores them, one row
per sample `[x_0 | x_1 | ... | z_base]`; every later step of Skip2-LoRA gathers rows from here and
never touches the base. The values are computed by the same network code as the engine's own
forward pass, so training from the cache gives the same adapters as training without.
"""

from __future__ import annotations

import numpy as np

from skip2fleet.shared.model import Model, spec_of, standardise
from skip2fleet.shared.network import ROWS_PER_PASS, Network


def build_cache(model: Model, x: np.ndarray) -> np.ndarray:
    """The cache rows for raw samples `x`."""
    network = Network(spec_of(model), model)
    x0 = standardise(model, x)
    rows = []
    for start in range(0, len(x0), ROWS_PER_PASS):
        z = network.forward(x0[start : start + ROWS_PER_PASS], keep_taps=True)
        rows.append(np.hstack([*network.taps, z]))
    return np.vstack(rows)
