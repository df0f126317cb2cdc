"""Skip-LoRA's adapters: from every block's input straight into the logits.

`z += sum_t (x_t A_t) B_t` over the taps x_t (the network's input, then each inner
block's output, flattened: on a CNN a block's whole (length x channels) map, so an adapter sees
where in the window a feature fired, as the MLP's adapters see every unit). The A_t are stacked
in one array `A_skip` (tap t's rows, r columns each: every A_t and its gradient contiguous) and
the B_t in `B_skip` (tap t's r rows), so every value of both is a parameter and both travel as
they are; the products with the B_t are one product with the stacked B. As with LoRA there is no
alpha / r scaling (`shared.peft.lora`). Merged for inference into one matrix `A_t B_t` per tap
(`shared.layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skip2fleet.shared.flops import WEIGHT_GRAD, matmul
from skip2fleet.shared.peft.lora import kaiming_uniform


@dataclass(frozen=True)
class AdapterPair:
    """One low-rank product A @ B inside the named arrays: A[a_rows] @ B[b_rows]."""

    a: str
    b: str
    a_rows: slice
    b_rows: slice
    layer: int  # LoRA, DoRA: the weighted layer it sits beside; skip: the tap it reads
    skip: bool


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
        taps: list[np.ndarray],
        rng: np.random.Generator,
    ) -> None:
        self.A, self.B, self.gB = params["A_skip"], params["B_skip"], grads["B_skip"]
        self.A[...] = np.concatenate([kaiming_uniform(rng, self.A[p.a_rows].shape) for p in pairs])
        self.H = np.zeros((len(taps[0]), self.B.shape[0]), self.A.dtype)
        self.dH = np.zeros_like(self.H)
        self.V = np.zeros((len(taps[0]), self.B.shape[1]), self.A.dtype)
        self.blocks = [
            (
                x,
                self.A[p.a_rows],
                grads["A_skip"][p.a_rows],
                self.H[:, p.b_rows],
                self.dH[:, p.b_rows],
            )
            for x, p in zip(taps, pairs, strict=True)
        ]

    def forward(self, z: np.ndarray) -> None:
        for x, a, _, h, _ in self.blocks:
            matmul(x, a, out=h)
        matmul(self.H, self.B, out=self.V)
        z += self.V

    def backward(self, dz: np.ndarray) -> None:
        matmul(self.H.T, dz, out=self.gB, kind=WEIGHT_GRAD)
        matmul(dz, self.B.T, out=self.dH, kind=WEIGHT_GRAD)
        for x, _, ga, _, dh in self.blocks:
            matmul(x.T, dh, out=ga, kind=WEIGHT_GRAD)
