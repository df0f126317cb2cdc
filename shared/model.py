"""The base network of the paper: x0 -> Linear-BN-ReLU -> x1 -> Linear-BN-ReLU -> x2 -> Linear -> z.

A model is a plain dict of NumPy arrays, so it saves as one `.npz` and hashes to one sha256 (the
base model's identity across the fleet). Inputs are standardised with statistics from the
pretraining data that travel inside the model, so a device feeds raw features.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skip2fleet.shared.atomic import write_atomic
from skip2fleet.shared.errors import FleetError

BN_EPS = 1e-5
HIDDEN = 96
ARRAY_NAMES = (
    "in_mean",
    "in_std",
    "W0",
    "b0",
    "gamma0",
    "beta0",
    "mean0",
    "var0",
    "W1",
    "b1",
    "gamma1",
    "beta1",
    "mean1",
    "var1",
    "W2",
    "b2",
)

Model = dict[str, np.ndarray]


def init_model(d_in: int, n_classes: int, rng: np.random.Generator, hidden: int = HIDDEN) -> Model:
    """A freshly initialised model (Kaiming-uniform weights, zero biases, identity batch norm)."""
    dims = (d_in, hidden, hidden, n_classes)
    model: Model = {"in_mean": np.zeros(d_in), "in_std": np.ones(d_in)}
    for layer in range(3):
        fan_in, fan_out = dims[layer], dims[layer + 1]
        bound = np.sqrt(6.0 / fan_in)
        model[f"W{layer}"] = rng.uniform(-bound, bound, (fan_in, fan_out))
        model[f"b{layer}"] = np.zeros(fan_out)
        if layer < 2:
            model[f"gamma{layer}"] = np.ones(fan_out)
            model[f"beta{layer}"] = np.zeros(fan_out)
            model[f"mean{layer}"] = np.zeros(fan_out)
            model[f"var{layer}"] = np.ones(fan_out)
    return {name: model[name].astype(np.float32) for name in ARRAY_NAMES}


def dims(model: Model) -> tuple[int, int, int, int]:
    """(d0, d1, d2, C): the widths of x0, x1, x2 and the logits."""
    return (*model["W0"].shape, model["W1"].shape[1], model["W2"].shape[1])


@dataclass(frozen=True)
class FoldedLayer:
    """A Linear layer with its frozen (inference-mode) batch norm folded in.

    `pre = x @ W + b` is followed by `pre * scale + shift`, so with a frozen base
    `x @ weight + bias` is the whole layer; `scale` is what LoRA outputs and gradients pass through.
    """

    weight: np.ndarray
    bias: np.ndarray
    scale: np.ndarray | float
    shift: np.ndarray | float


def batchnorm_affine(model: Model, layer: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Inference-mode batch norm as `scale * pre + shift`."""
    scale = model[f"gamma{layer}"] / np.sqrt(model[f"var{layer}"] + BN_EPS)
    shift = model[f"beta{layer}"] - model[f"mean{layer}"] * scale
    return scale.astype(dtype), shift.astype(dtype)


def fold(model: Model, dtype: np.dtype = np.float32) -> list[FoldedLayer]:
    """The three layers with batch norm in inference mode folded into weight and bias."""
    layers = []
    for layer in range(3):
        weight = model[f"W{layer}"].astype(dtype)
        bias = model[f"b{layer}"].astype(dtype)
        if layer < 2:
            scale, shift = batchnorm_affine(model, layer, dtype)
            layers.append(FoldedLayer(weight * scale, bias * scale + shift, scale, shift))
        else:
            layers.append(FoldedLayer(weight, bias, 1.0, 0.0))
    return layers


def standardise(model: Model, x: np.ndarray) -> np.ndarray:
    """Raw features to the network's input x0."""
    return ((x - model["in_mean"]) / model["in_std"]).astype(model["W0"].dtype)


def forward_frozen(model: Model, x: np.ndarray) -> list[np.ndarray]:
    """[x0, x1, x2, z] of the frozen base for raw features `x` (batch norm in inference mode)."""
    acts = [standardise(model, x)]
    for layer, folded in enumerate(fold(model, model["W0"].dtype)):
        out = acts[-1] @ folded.weight + folded.bias
        acts.append(np.maximum(out, 0) if layer < 2 else out)
    return acts


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Percent of rows whose largest logit is the label."""
    return float(100.0 * np.mean(np.argmax(logits, axis=1) == y))


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
    """Read a model saved by `save`; every array must be there, finite, and chain into one net."""
    path = Path(path)
    if not path.is_file():
        raise FleetError(f"{path}: no such base model file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            model = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FleetError(f"{path}: not a readable .npz model ({exc})") from exc
    missing = [name for name in ARRAY_NAMES if name not in model]
    if missing:
        raise FleetError(f"{path}: not a skip2fleet model, missing arrays {', '.join(missing)}")
    for name, array in model.items():
        if not np.all(np.isfinite(array)):
            raise FleetError(f"{path}: array {name} holds NaN or Inf")
    d0, d1, d2, _ = dims(model)
    if model["W1"].shape[0] != d1 or model["W2"].shape[0] != d2 or model["in_mean"].shape != (d0,):
        raise FleetError(f"{path}: array shapes do not chain into one network")
    return model
