"""Between NumPy and Flower records: the base model, a plan, figures, packed adapters, their bytes.

Packed adapters are a method's flat `theta` (`shared.layout`) as one float32 array, `THETA`.
Sender and receiver check it the same way (`check_adapters`), on the record's metadata, so a
receiver refuses a wrong dtype, shape or size before any array is built from it.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from skip2fleet.shared.model import Model
from skip2fleet.shared.protocol import PLAN_JSON, ROSTER_JSON, THETA, Entry, Figures, RoundPlan

NPY_HEADER_MAX = 1024  # bytes an Array spends on its .npy header beyond the values


def model_record(model: Model) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in model.items()})


def record_model(record: ArrayRecord) -> Model:
    return {name: array.numpy() for name, array in record.items()}


def plan_record(plan: RoundPlan | dict) -> ConfigRecord:
    """A plan (or its values) as one JSON string: Flower checks and serialises a record value by
    value, and a coordinator sends a plan to every node each round."""
    values = plan.values() if isinstance(plan, RoundPlan) else plan
    return ConfigRecord({PLAN_JSON: json.dumps(values)})


def roster_record(entries: list[Entry]) -> ArrayRecord:
    """Every device's entry, for nodes whose device the coordinator does not know yet: JSON in
    one byte array, so Flower computes its object id once however many messages share it (a
    ConfigRecord's is computed again for each message)."""
    text = json.dumps([dataclasses.asdict(e) for e in entries]).encode()
    return ArrayRecord({ROSTER_JSON: Array(np.frombuffer(text, np.uint8))})


def record_roster(record: ArrayRecord) -> list[dict]:
    if list(record.keys()) != [ROSTER_JSON] or record[ROSTER_JSON].dtype != "uint8":
        raise ValueError(f"a roster is one uint8 array {ROSTER_JSON!r}")
    entries = json.loads(record[ROSTER_JSON].numpy().tobytes())
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError("a roster is a JSON list of device entries")
    return entries


def figures_record(figures: Figures) -> MetricRecord:
    return MetricRecord(dataclasses.asdict(figures))


def adapters_record(theta: np.ndarray, size: int) -> ArrayRecord:
    """`theta` as it travels: one float32 array of `size` values (checked)."""
    record = ArrayRecord({THETA: Array(np.ascontiguousarray(theta, dtype=np.float32))})
    check_adapters(record[THETA], size)
    return record


def record_adapters(record: ArrayRecord, size: int) -> np.ndarray:
    """The packed adapters of a record, checked before the array is built: a read-only view of
    the bytes Flower received, not a copy (10,000 devices' replies are held once, not twice)."""
    if list(record.keys()) != [THETA]:
        raise ValueError(f"expected one array {THETA!r}, got {sorted(record.keys())}")
    return float32_view(check_adapters(record[THETA], size).data, size)


def float32_view(data: bytes, size: int) -> np.ndarray:
    """The float32 vector of `size` values an .npy image holds, as a view of it (its own header
    checked too: the Array's metadata may say one thing and its bytes another)."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f".npy version {version}")
        shape, fortran, dtype = read_header(stream)
    except ValueError as exc:
        raise ValueError(f"adapters: not an .npy image ({exc})") from None
    if dtype != np.dtype("<f4") or shape != (size,) or fortran:
        raise ValueError(f"adapters' .npy header says {dtype} {shape}, expected float32 ({size},)")
    if len(data) - stream.tell() != 4 * size:
        raise ValueError(f"adapters take {len(data) - stream.tell()} bytes, {4 * size} expected")
    return np.frombuffer(data, np.float32, size, stream.tell())


def check_adapters(array: Array, size: int) -> Array:
    """The one wire check of packed adapters: float32, flat, `size` values, and no more bytes
    than those take (read from the Array's metadata; Flower has already inflated the message)."""
    if array.dtype != "float32" or tuple(array.shape) != (size,):
        raise ValueError(
            f"adapters are {array.dtype} {tuple(array.shape)}, expected float32 ({size},)"
        )
    if len(array.data) > 4 * size + NPY_HEADER_MAX:
        raise ValueError(f"adapters take {len(array.data)} bytes, at most {4 * size} expected")
    return array


def wire_bytes(obj, known: dict[int, int] | None = None) -> int:
    """Bytes Flower ships for a message object: its serialised form plus its children's.
    `known`: sizes already measured, by object, for objects that many messages share."""
    if known is not None and id(obj) in known:
        return known[id(obj)]
    size = len(obj.deflate()) + sum(wire_bytes(c, known) for c in (obj.children or {}).values())
    if known is not None:
        known[id(obj)] = size
    return size
