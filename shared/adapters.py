"""Adapters as a file and on the wire.

On the wire a device sends only real parameters: the engine's flat `theta` minus the zeros that
keep the skip adapters' A block-diagonal. Both sides derive the layout from (method, spec, rank),
so the packed vector is one float32 array with no names or shapes around it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from skip2fleet.shared.atomic import write_atomic
from skip2fleet.shared.engine import adapter_pairs, trainable_shapes, unflatten
from skip2fleet.shared.methods import Method
from skip2fleet.shared.spec import Spec


def _parts(method: Method, spec: Spec, rank: int, theta: np.ndarray) -> list:
    arrays = unflatten(theta, trainable_shapes(method, spec, rank))
    blocks = [arrays["A_skip"][p.rows, p.cols] for p in adapter_pairs(method, spec, rank) if p.skip]
    return [blocks if name == "A_skip" else [array] for name, array in arrays.items()]


def packed_size(method: Method, spec: Spec, rank: int) -> int:
    shapes = trainable_shapes(method, spec, rank)
    theta = np.zeros(sum(int(np.prod(s)) for s in shapes.values()), np.float32)
    return sum(part.size for group in _parts(method, spec, rank, theta) for part in group)


def pack(theta: np.ndarray, method: Method, spec: Spec, rank: int) -> np.ndarray:
    """The real parameters of `theta`, as one float32 vector."""
    groups = _parts(method, spec, rank, theta)
    return np.concatenate([part.ravel() for group in groups for part in group]).astype(np.float32)


def unpack(packed: np.ndarray, method: Method, spec: Spec, rank: int) -> np.ndarray:
    """The engine's `theta` (zeros off the skip blocks) from a packed vector."""
    expected = packed_size(method, spec, rank)
    if packed.ndim != 1 or packed.size != expected:
        raise ValueError(f"expected {expected} packed values, got shape {packed.shape}")
    shapes = trainable_shapes(method, spec, rank)
    theta = np.zeros(sum(int(np.prod(s)) for s in shapes.values()), np.float32)
    offset = 0
    for group in _parts(method, spec, rank, theta):
        for part in group:
            part[...] = packed[offset : offset + part.size].reshape(part.shape)
            offset += part.size
    return theta


def save_adapters(
    path: Path, arrays: dict[str, np.ndarray], method: str, rank: int, base_sha256: str
) -> Path:
    """Write the trained arrays with the method, rank and base hash they belong to."""
    meta = {"meta.method": method, "meta.rank": rank, "meta.base_sha256": base_sha256}
    content = {**arrays, **{key: np.array(value) for key, value in meta.items()}}
    return write_atomic(path, lambda handle: np.savez(handle, **content))
