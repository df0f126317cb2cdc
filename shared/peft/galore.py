"""GaLore: full-rank weights, each weight matrix's gradient projected to rank r before the step.

Every `interval` steps (default 200, the GaLore class's) a truncated SVD of the matrix's current
gradient G refreshes its projector: P, the top-r left singular vectors when G has no more rows than
columns, else Q, the top-r right ones. The step is `scale * P P^T G` (or `G Q Q^T`; default scale
1.0), under the same plain SGD as every other method, so the optimizer state is the projectors
alone (with Adam it would also hold the moments, r x n per matrix, in this same flat layout).
Weights are already 2-D here, a conv kernel as (C_in * k, C_out), the transpose of GaLore's
C_out x C_in*k, which gives the same projection. Matrices whose smaller side is at most r gain
nothing from projecting and take the plain step; biases and batch norm too. The SVDs are counted
apart from the step's FLOPs (the study's profiler left them out), by estimate, amortised over the
interval.
"""

from __future__ import annotations

import numpy as np

from skip2fleet.shared import flops
from skip2fleet.shared.flops import SVD, matmul, svd_flops
from skip2fleet.shared.peft.sgd import descend

INTERVAL = 200
SCALE = 1.0


class GaLore:
    def __init__(self, tuner) -> None:
        self.theta, self.grad = tuner.theta, tuner.grad
        self.rank, self.interval, self.scale = tuner.rank, tuner.galore_interval, tuner.galore_scale
        self.grads = [
            g for name, g in tuner.grads.items() if name[0] == "W" and min(g.shape) > self.rank
        ]
        self.projectors: list[np.ndarray] = []
        self.svd_per_step = sum(svd_flops(*g.shape) for g in self.grads) // self.interval
        self.steps = 0

    def update(self, lr: float) -> None:
        if self.steps % self.interval == 0:
            self.projectors = [self._projector(g) for g in self.grads]
        self.steps += 1
        flops.add(self.svd_per_step, SVD)  # amortised: one SVD per matrix every `interval` steps
        for g, p in zip(self.grads, self.projectors, strict=True):
            if g.shape[0] <= g.shape[1]:
                g[...] = matmul(p, matmul(p.T, g))
            else:
                g[...] = matmul(matmul(g, p), p.T)
            g *= self.scale
        descend(self.theta, self.grad, lr)

    def _projector(self, g: np.ndarray) -> np.ndarray:
        u, _, vt = np.linalg.svd(g, full_matrices=False)
        return u[:, : self.rank] if g.shape[0] <= g.shape[1] else vt[: self.rank].T
