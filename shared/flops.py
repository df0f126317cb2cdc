"""Every matrix product of the numerical core goes through `matmul`, so a step's FLOPs count.

A multiply-add is 2 FLOPs; the count covers products (linear layers, im2col convolutions, adapters)
and the depthwise convolutions' multiply-adds, which are the arithmetic that grows with the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_counter: list[int] | None = None


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    if _counter is not None:
        _counter[0] += 2 * (a.size // a.shape[-1]) * a.shape[-1] * b.shape[-1]
    return np.matmul(a, b, out=out)


def add(flops: int) -> None:
    """Count arithmetic done outside `matmul` (a depthwise convolution's multiply-adds)."""
    if _counter is not None:
        _counter[0] += flops


@contextmanager
def count_flops() -> Iterator[list[int]]:
    """Within the block, count the FLOPs of every product; the total is `counter[0]`."""
    global _counter
    _counter = [0]
    try:
        yield _counter
    finally:
        _counter = None
