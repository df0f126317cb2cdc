"""Plain SGD with a constant learning rate on the flat vector of every trainable: two NumPy calls
per step for any method, no optimizer state (the gradient is scaled in place, as it is written
afresh every step), and the same for every method so timings compare."""

from __future__ import annotations

import numpy as np

from skip2fleet.shared import flops


class SGD:
    def __init__(self, tuner) -> None:
        self.theta, self.grad = tuner.theta, tuner.grad

    def update(self, lr: float) -> None:
        descend(self.theta, self.grad, lr)


def descend(theta: np.ndarray, grad: np.ndarray, lr: float) -> None:
    """`theta -= lr * grad` with no buffer: the gradient becomes the step."""
    np.multiply(grad, -lr, out=grad)
    theta += grad
    flops.add(2 * theta.size)
