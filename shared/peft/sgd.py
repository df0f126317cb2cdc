"""Plain SGD with a constant learning rate on the flat vector of every trainable: two NumPy calls
per step for any method, no optimizer state, and the same for every method so timings compare."""

from __future__ import annotations

import numpy as np


class SGD:
    def __init__(self, tuner) -> None:
        self.theta, self.grad = tuner.theta, tuner.grad
        self.step = np.zeros_like(tuner.theta)

    def update(self, lr: float) -> None:
        np.multiply(self.grad, lr, out=self.step)
        self.theta -= self.step
