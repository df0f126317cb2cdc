"""Between NumPy and Flower records: the base model, packed adapters, their bytes on the wire."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from skip2fleet.shared.model import Model


def model_record(model: Model) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in model.items()})


def record_model(record: ArrayRecord) -> Model:
    return {name: array.numpy() for name, array in record.items()}


def vector_record(vector: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"theta": Array(np.ascontiguousarray(vector, dtype=np.float32))})


def record_vector(record: ArrayRecord) -> np.ndarray:
    """The one array of a packed-adapters record, as sent (dtype and shape unchecked)."""
    if list(record.keys()) != ["theta"]:
        raise ValueError(f"expected one array 'theta', got {sorted(record.keys())}")
    return record["theta"].numpy()


def wire_bytes(obj) -> int:
    """Bytes Flower ships for a message object: its serialised form plus its children's."""
    return len(obj.deflate()) + sum(wire_bytes(c) for c in (obj.children or {}).values())
