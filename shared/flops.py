"""Every matrix product of the numerical core goes through `matmul`, so a step's FLOPs count.

A multiply-add is 2 FLOPs. The count covers products (linear layers, im2col convolutions,
adapters), the depthwise convolutions' multiply-adds and the optimizer's update: the arithmetic
that grows with the model. Element-wise work (ReLU, batch norm, the loss) is not counted, as in the
edge-PEFT study's profiler. Each FLOP lands in one category: the phase it runs in (`phase`:
forward, update), and in backward the kind of gradient its caller says it computes
(`INPUT_GRAD` or `WEIGHT_GRAD`). GaLore's SVDs are counted apart (`SVD`), by an estimate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

FORWARD, INPUT_GRAD, WEIGHT_GRAD, UPDATE, SVD = (
    "forward",
    "input_grad",
    "weight_grad",
    "update",
    "svd",
)
CATEGORIES = (FORWARD, INPUT_GRAD, WEIGHT_GRAD, UPDATE, SVD)

_counter: Counter[str] | None = None
_phase = FORWARD


def matmul(
    a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, kind: str | None = None
) -> np.ndarray:
    """`a @ b`, counted under `kind` (in backward: INPUT_GRAD or WEIGHT_GRAD) or the phase."""
    if _counter is not None:
        _counter[kind or _phase] += 2 * (a.size // a.shape[-1]) * a.shape[-1] * b.shape[-1]
    return np.matmul(a, b, out=out)


def add(flops: int, kind: str | None = None) -> None:
    """Count arithmetic done outside `matmul` (depthwise multiply-adds, the SGD step, an SVD)."""
    if _counter is not None:
        _counter[kind or _phase] += flops


def svd_flops(rows: int, cols: int) -> int:
    """Estimated FLOPs of a thin SVD with both singular bases (Golub & Van Loan's R-SVD:
    6 m n^2 + 11 n^3 for m >= n); LAPACK does not report its own count."""
    m, n = max(rows, cols), min(rows, cols)
    return 6 * m * n * n + 11 * n**3


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Within the block, uncategorised FLOPs count under `name`."""
    global _phase
    before, _phase = _phase, name
    try:
        yield
    finally:
        _phase = before


@contextmanager
def count_flops() -> Iterator[Counter[str]]:
    """Within the block, count the FLOPs of every product by category; `sum(counter.values())`
    is the total."""
    global _counter
    _counter = Counter()
    try:
        yield _counter
    finally:
        _counter = None
