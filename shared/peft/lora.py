"""LoRA beside a linear or conv1d layer, as HF PEFT does it: `out += (cols @ A) @ B`.

On a convolution, `cols` are the layer's im2col rows, so A is a convolution from C_in to r with the
layer's kernel and B a 1x1 convolution from r to C_out. B starts at zero, so training starts at the
base model. PEFT's scaling alpha / r is 1 here (alpha = r, as PEFT's defaults have it): the
product A @ B is the whole update, on the wire and in aggregation (`shared.layout`). Merged for
inference into `W + A @ B`.
"""

from __future__ import annotations

import numpy as np

from skip2fleet.shared.flops import INPUT_GRAD, WEIGHT_GRAD, matmul
from skip2fleet.shared.spec import Placed


def kaiming_uniform(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """PEFT's LoRA-A init: Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / np.sqrt(shape[0])
    return rng.uniform(-bound, bound, shape)


class LoRA:
    needs_weight_grad = False

    @staticmethod
    def shapes(p: Placed, rank: int) -> dict[str, tuple[int, ...]]:
        fan_in, out = p.weight_shape
        return {f"A{p.k}": (fan_in, rank), f"B{p.k}": (rank, out)}

    def __init__(
        self,
        k: int,
        params: dict[str, np.ndarray],
        grads: dict[str, np.ndarray],
        base: np.ndarray,
        rng: np.random.Generator,
    ) -> None:
        self.A, self.B = params[f"A{k}"], params[f"B{k}"]
        self.gA, self.gB = grads[f"A{k}"], grads[f"B{k}"]
        self.A[...] = kaiming_uniform(rng, self.A.shape)

    def weight(self, base: np.ndarray) -> np.ndarray:
        return base

    def add(self, cols: np.ndarray, out: np.ndarray) -> None:
        self.u = matmul(cols, self.A)
        out += matmul(self.u, self.B)

    def backward(
        self, cols: np.ndarray, dout: np.ndarray, dweight: None, need_dx: bool
    ) -> np.ndarray | None:
        matmul(self.u.T, dout, out=self.gB, kind=WEIGHT_GRAD)
        du = matmul(dout, self.B.T, kind=WEIGHT_GRAD)
        matmul(cols.T, du, out=self.gA, kind=WEIGHT_GRAD)
        return matmul(du, self.A.T, kind=INPUT_GRAD) if need_dx else None

    @staticmethod
    def merge(weight: np.ndarray, views: dict[str, np.ndarray], k: int) -> np.ndarray:
        """Layer k's weight with its adapter `views` (A{k}, B{k}) folded in, for inference."""
        return weight + views[f"A{k}"] @ views[f"B{k}"]
