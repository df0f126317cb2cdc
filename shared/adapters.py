"""Adapters as a file and on the wire.

On the wire a device sends the engine's flat `theta` as float32: every value of it is a
parameter (the skip adapters are stacked, `shared.peft.skip`). Both sides
derive the layout from (method, spec, rank), so the vector travels with no names or shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from skip2fleet.shared.atomic import write_atomic
from skip2fleet.shared.engine import trainable_shapes
from skip2fleet.shared.methods import Method
from skip2fleet.shared.spec import Spec


def packed_size(method: Method, spec: Spec, rank: int) -> int:
    return sum(int(np.prod(s)) for s in trainable_shapes(method, spec, rank).values())


def pack(theta: np.ndarray, method: Method, spec: Spec, rank: int) -> np.ndarray:
    """`theta` as the float32 vector that travels (a copy), its size checked."""
    return _wire_vector(theta, method, spec, rank)


def unpack(packed: np.ndarray, method: Method, spec: Spec, rank: int) -> np.ndarray:
    """The engine's `theta` from a packed vector (a float32 copy), its size checked."""
    return _wire_vector(packed, method, spec, rank)


def _wire_vector(vector: np.ndarray, method: Method, spec: Spec, rank: int) -> np.ndarray:
    """Sender and receiver check the same thing: one flat vector of the layout's size."""
    expected = packed_size(method, spec, rank)
    if vector.ndim != 1 or vector.size != expected:
        raise ValueError(f"expected {expected} packed values, got shape {vector.shape}")
    return vector.astype(np.float32)


def save_adapters(
    path: Path, arrays: dict[str, np.ndarray], method: str, rank: int, base_sha256: str
) -> Path:
    """Write the trained arrays with the method, rank and base hash they belong to."""
    meta = {"meta.method": method, "meta.rank": rank, "meta.base_sha256": base_sha256}
    content = {**arrays, **{key: np.array(value) for key, value in meta.items()}}
    return write_atomic(path, lambda handle: np.savez(handle, **content))
