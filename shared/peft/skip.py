"""Skip-LoRA's adapters: from every block's input straight into the logits.

`z += sum_t (x_t A_t) B_t * alpha/r` over the taps x_t (the network's input, then each inner
block's output, flattened: on a CNN a block's whole (length x channels) map, so an adapter sees
where in the window a feature fired, as the MLP's adapters see every unit). The taps sit side by
side in one row `[x_0 | x_1 | ...]` and the A_t on the diagonal of one block-diagonal A (its other
blocks stay zero and never travel, `shared.adapters`); the products with the B_t are one product
with the stacked B. The products `x_t A_t` are computed one of two ways, chosen from the spec's
shapes: while A is small (the MLP's 412 x 12), as one product with the whole block-diagonal A,
kept block-diagonal by a gradient mask, because at batch 20 a NumPy call costs more than the
wasted arithmetic; beyond `ONE_PRODUCT_MAX` values (the CNN's 4224 x 16, where that product took
15x as long as the four real ones, measured here) as one product per tap. Merged for inference
into one matrix `A_t B_t * alpha/r` per tap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skip2fleet.shared.flops import WEIGHT_GRAD, matmul
from skip2fleet.shared.peft.lora import kaiming_uniform

ONE_PRODUCT_MAX = 8192  # values of the block-diagonal A up to which one product beats one per tap


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
        xcat: np.ndarray,
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
        self.xcat = xcat
        self.H = np.zeros((len(xcat), self.A.shape[1]), self.A.dtype)
        self.dH = np.zeros_like(self.H)
        self.V = np.zeros((len(xcat), self.B.shape[1]), self.A.dtype)
        self.one_product = self.A.size <= ONE_PRODUCT_MAX
        self.blocks = [
            (xcat[:, p.rows], self.A[p.rows, p.cols], self.gA[p.rows, p.cols], p.cols)
            for p in pairs
        ]

    def forward(self, z: np.ndarray) -> None:
        if self.one_product:
            matmul(self.xcat, self.A, out=self.H)
        else:
            for x, a, _, cols in self.blocks:
                matmul(x, a, out=self.H[:, cols])
        self.H *= self.scaling  # H holds (x A) * alpha/r, so B's gradient needs no rescaling
        matmul(self.H, self.B, out=self.V)
        z += self.V

    def backward(self, dz: np.ndarray) -> None:
        matmul(self.H.T, dz, out=self.gB, kind=WEIGHT_GRAD)
        matmul(dz, self.B.T, out=self.dH, kind=WEIGHT_GRAD)
        if self.one_product:
            matmul(self.xcat.T, self.dH, out=self.gA, kind=WEIGHT_GRAD)
            self.gA *= self.mask
            return
        self.dH *= self.scaling
        for x, _, ga, cols in self.blocks:
            matmul(x.T, self.dH[:, cols], out=ga, kind=WEIGHT_GRAD)

    def merged(self) -> list[tuple[int, np.ndarray]]:
        """(tap, matrix from the tap straight into the logits) per adapter."""
        return [
            (p.layer, self.scaling * (self.A[p.rows, p.cols] @ self.B[p.cols])) for p in self.pairs
        ]
