"""The base model as a file: its spec (`shared.spec`) and its arrays, with one identity.

A model is a plain dict of NumPy arrays, its spec among them as UTF-8 JSON bytes (`spec`), so it
saves as one `.npz`, travels as one record and hashes to one sha256 (the base model's identity
across the fleet) that covers the architecture too. Inputs are standardised with statistics from
the pretraining data that travel inside the model (per feature for vectors, per channel for
windows), so a device feeds raw samples. A file without a spec is the paper's MLP, as before specs.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from skip2fleet.shared.atomic import write_atomic
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.spec import WEIGHTED, Spec, mlp

SPEC_KEY = "spec"
CLASSES_KEY = "classes"  # the class names, UTF-8 JSON bytes like the spec

Model = dict[str, np.ndarray]


def spec_array(spec: Spec) -> np.ndarray:
    return np.frombuffer(spec.to_json().encode(), np.uint8).copy()


def spec_of(model: Model) -> Spec:
    """The model's spec; the paper's MLP for a model saved before specs."""
    if SPEC_KEY in model:
        return Spec.from_json(bytes(model[SPEC_KEY]).decode())
    return mlp(model["W0"].shape[0], model["W2"].shape[1], model["W0"].shape[1])


def with_classes(model: Model, classes: Sequence[str]) -> Model:
    """The model carrying its class names, so a device can read labels given as names and say
    what it predicts."""
    if len(classes) != spec_of(model).n_classes:
        raise FleetError(f"{len(classes)} class names for a model of {spec_of(model).n_classes}")
    names = np.frombuffer(json.dumps(list(classes)).encode(), np.uint8).copy()
    return {**model, CLASSES_KEY: names}


def classes_of(model: Model) -> tuple[str, ...]:
    """The model's class names; its indices as names for a model saved without them."""
    if CLASSES_KEY in model:
        return tuple(json.loads(bytes(model[CLASSES_KEY]).decode()))
    return tuple(str(i) for i in range(spec_of(model).n_classes))


def init_model(spec: Spec, rng: np.random.Generator) -> Model:
    """A freshly initialised model (Kaiming-uniform weights, zero biases, identity batch norm)."""
    model: Model = {}
    for name, shape in spec.array_shapes().items():
        zero = name == "in_mean" or name[0] == "b" or name.startswith("mean")  # b, beta too
        model[name] = np.full(shape, 0.0 if zero else 1.0)
    for p in spec.placed():
        if p.layer.op in WEIGHTED:
            fan_in = p.weight_shape[0]
            bound = np.sqrt(6.0 / fan_in)
            model[f"W{p.k}"] = rng.uniform(-bound, bound, p.weight_shape)
    model = {name: array.astype(np.float32) for name, array in model.items()}
    model[SPEC_KEY] = spec_array(spec)
    return model


def standardise(model: Model, x: np.ndarray) -> np.ndarray:
    """Raw samples to the network's input x0."""
    return ((x - model["in_mean"]) / model["in_std"]).astype(model["W0"].dtype)


def logits(model: Model, x: np.ndarray) -> np.ndarray:
    """The base model's logits for raw samples `x`."""
    from skip2fleet.shared.predictor import Predictor

    return Predictor(spec_of(model), model)(x)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Percent of rows whose largest logit is the label."""
    return float(100.0 * np.mean(np.argmax(logits, axis=1) == y))


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax of rows of logits."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean softmax cross-entropy of rows of logits against integer labels."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(log_p[np.arange(len(y)), y]))


def sha256(model: Model) -> str:
    """The model's identity: a hash of every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(model):
        array = np.ascontiguousarray(model[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save(model: Model, path: Path) -> str:
    """Write the model atomically as `.npz`; returns its sha256."""
    write_atomic(path, lambda handle: np.savez(handle, **model))
    return sha256(model)


def load(path: Path) -> Model:
    """Read a model saved by `save`; every array of its spec must be there, shaped, and finite."""
    path = Path(path)
    if not path.is_file():
        raise FleetError(f"{path}: no such base model file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            model = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FleetError(f"{path}: not a readable .npz model ({exc})") from exc
    if SPEC_KEY not in model and not {"W0", "W2"} <= set(model):
        raise FleetError(f"{path}: not a skip2fleet model, missing arrays spec")
    try:
        shapes = spec_of(model).array_shapes()
    except FleetError as exc:
        raise FleetError(f"{path}: {exc}") from None
    missing = [name for name in shapes if name not in model]
    if missing:
        raise FleetError(f"{path}: not a skip2fleet model, missing arrays {', '.join(missing)}")
    for name, array in model.items():
        if not np.all(np.isfinite(array)):
            raise FleetError(f"{path}: array {name} holds NaN or Inf")
    wrong = [name for name, shape in shapes.items() if model[name].shape != shape]
    if wrong:
        raise FleetError(f"{path}: arrays {', '.join(wrong)} do not match the model's spec")
    return model
