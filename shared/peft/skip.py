"""Skip-LoRA's adapters: from every block's input straight into the logits.

`z += sum_t (x_t A_t) B_t * alpha/r` over the taps x_t (the network's input, then each inner
block's output, flattened: on a CNN a block's whole (length x channels) map, so an adapter sees
where in the window a feature fired, as the MLP's adapters see every unit). The taps sit side by
side in one row `[x_0 | x_1 | ...]`, so the products `x_t A_t` are one product with a
block-diagonal A (kept block-diagonal by a gradient mask) and the products with the B_t one product
with the stacked B. Merged for inference into one matrix `A_t B_t * alpha/r` per tap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skip2fleet.shared.flops import matmul
from skip2fleet.shared.peft.lora import kaiming_uniform


@dataclass(frozen=True)
class AdapterPair:
    """One low-rank product A @ B inside the named arrays: A[rows, cols] @ B[cols, :]."""

    a: str
    b: str
    rows: slice
    cols: slice
    layer: int  # LoRA, DoRA: the weighted layer it sits beside; skip: the tap it reads
    skip: bool


def _cols(tap: int, rank: int) -> slice:
    return slice(tap * rank, (tap + 1) * rank)


def skip_pairs(taps: list[int], rank: int) -> list[AdapterPair]:
    starts = [int(s) for s in np.cumsum([0, *taps])]
    return [
        AdapterPair(
            "A_skip",
            "B_skip",
            slice(starts[t], starts[t + 1]),
            slice(t * rank, (t + 1) * rank),
            t,
            True,
        )
        for t in range(len(taps))
    ]


class Skip:
    def __init__(
        self,
        params: dict[str, np.ndarray],
        grads: dict[str, np.ndarray],
        pairs: list[AdapterPair],
        scaling: float,
        batch: int,
        rng: np.random.Generator,
    ) -> None:
        self.A, self.B, self.gA, self.gB = (
            params["A_skip"],
            params["B_skip"],
            grads["A_skip"],
            grads["B_skip"],
        )
        self.pairs, self.scaling = pairs, scaling
        self.mask = np.zeros(self.A.shape, self.A.dtype)
        for pair in pairs:
            self.A[pair.rows, pair.cols] = kaiming_uniform(
                rng, (pair.rows.stop - pair.rows.start, pair.cols.stop - pair.cols.start)
            )
            self.mask[pair.rows, pair.cols] = scaling
        self.H = np.zeros((batch, self.A.shape[1]), self.A.dtype)
        self.dH = np.zeros_like(self.H)
        self.V = np.zeros((batch, self.B.shape[1]), self.A.dtype)

    def forward(self, xcat: np.ndarray, z: np.ndarray) -> None:
        matmul(xcat, self.A, out=self.H)
        self.H *= self.scaling  # H holds (x A) * alpha/r, so B's gradient needs no rescaling
        matmul(self.H, self.B, out=self.V)
        z += self.V

    def backward(self, xcat: np.ndarray, dz: np.ndarray) -> None:
        matmul(self.H.T, dz, out=self.gB)
        matmul(dz, self.B.T, out=self.dH)
        matmul(xcat.T, self.dH, out=self.gA)
        self.gA *= self.mask

    def merged(self) -> list[tuple[int, np.ndarray]]:
        """(tap, matrix from the tap straight into the logits) per adapter."""
        return [
            (p.layer, self.scaling * (self.A[p.rows, p.cols] @ self.B[p.cols])) for p in self.pairs
        ]
