"""DoRA: `W' = m * V / ||V||_c` with `V = W + A @ B`, one magnitude per output channel.

The norm is over each output channel's column (C_in and the kernel), `m` starts at `||W||_c`, so
training starts at the base. As the DoRA paper (section 4.3) and PEFT do, the norm is treated as a
constant in backward: gradients flow through `m` and the direction `V` but not through `||V||`,
which saves memory and, per the paper, barely changes the result. So the gradient is exact for the
function with the norm held at its current value, and that is what the tests check. Merged for
inference into `W'` itself.
"""

from __future__ import annotations

import numpy as np

from skip2fleet.shared.flops import WEIGHT_GRAD, matmul
from skip2fleet.shared.peft.lora import LoRA
from skip2fleet.shared.spec import Placed


class DoRA:
    needs_weight_grad = True

    @staticmethod
    def shapes(p: Placed, rank: int) -> dict[str, tuple[int, ...]]:
        return {**LoRA.shapes(p, rank), f"m{p.k}": (p.weight_shape[1],)}

    def __init__(
        self,
        k: int,
        params: dict[str, np.ndarray],
        grads: dict[str, np.ndarray],
        base: np.ndarray,
        rng: np.random.Generator,
    ) -> None:
        self.lora = LoRA(k, params, grads, base, rng)
        self.m, self.gm = params[f"m{k}"], grads[f"m{k}"]
        self.m[...] = np.linalg.norm(base, axis=0)
        self.held_norm: np.ndarray | None = None  # tests: hold ||V|| fixed to check gradients

    def weight(self, base: np.ndarray) -> np.ndarray:
        self.V = base + matmul(self.lora.A, self.lora.B)
        norm = np.linalg.norm(self.V, axis=0) if self.held_norm is None else self.held_norm
        self.inv_norm = 1.0 / norm
        self.per_norm = self.m * self.inv_norm
        return self.V * self.per_norm

    def add(self, cols: np.ndarray, out: np.ndarray) -> None:
        """DoRA adds no term of its own: it changes the weight."""

    def backward(
        self, cols: np.ndarray, dout: np.ndarray, dweight: np.ndarray, need_dx: bool
    ) -> None:
        """Gradients of m, A and B; the layer's input gradient goes through W' alone."""
        lora = self.lora
        np.add.reduce(dweight * self.V, axis=0, out=self.gm)
        self.gm *= self.inv_norm
        dV = dweight * self.per_norm
        matmul(dV, lora.B.T, out=lora.gA, kind=WEIGHT_GRAD)
        matmul(lora.A.T, dV, out=lora.gB, kind=WEIGHT_GRAD)

    @staticmethod
    def merge(weight: np.ndarray, views: dict[str, np.ndarray], k: int) -> np.ndarray:
        """Layer k's weight `m * V / ||V||_c` from its adapter `views`, for inference (the same
        arithmetic as `weight`, with the norm of V as it is)."""
        direction = weight + views[f"A{k}"] @ views[f"B{k}"]
        return direction * (views[f"m{k}"] * (1.0 / np.linalg.norm(direction, axis=0)))
