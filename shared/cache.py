"""The Skip2-LoRA forward cache.

With the base frozen and batch norm in inference mode, a sample's x0, x1, x2 and base logits never
change during fine-tuning. One pass of the frozen base stores them, one row per sample
`[x0 | x1 | x2 | z_base]` (d0 + d1 + d2 + C floats); every later step of Skip2-LoRA gathers rows
from here and never touches the base. The values are computed with the same products as the
engine's own forward pass, so training from the cache gives the same adapters as training without.
"""

from __future__ import annotations

import numpy as np

from skip2fleet.shared.model import Model, forward_frozen


def build_cache(model: Model, x: np.ndarray) -> np.ndarray:
    """The cache rows for raw features `x`."""
    return np.hstack(forward_frozen(model, x))
