"""The Skip2-LoRA forward cache, exact or quantized.

With the base frozen and batch norm in inference mode, a sample's skip taps (every block's input)
and base logits never change during fine-tuning. One pass of the frozen base stores them, one row
per sample `[x_0 | x_1 | ... | z_base]`; every later step of Skip2-LoRA gathers rows from here and
never touches the base. The values come from the same network code as the engine's own forward
pass, so training from an `f32` cache gives the same adapters as training without.

Codecs (`Codec`): `f32` keeps the rows as they are; `int8` and `int4` (two codes a byte) store
each tap value as `code * scale + offset`, round-to-nearest, with one scale and offset per
**group**: per sample, per tap, in runs of at most `GROUP` values. Per sample and tap, because the
taps live on different scales (standardised inputs, post-ReLU activations) and samples differ in
range; at most `GROUP` values, so that one outlier coarsens at most that many values, while the
scale and offset (two float16s, 4 bytes) cost at most 1/32 byte per value. The base logits are
kept in float16 (C values a sample; they enter the logits directly, so they are not quantized). A
group's error is at most half its scale (`max_error`). Building runs in passes of `ROWS_PER_PASS`
samples and a batch's gather dequantizes straight into the engine's batch buffer: the cache is
never expanded whole in memory.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np

from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.model import Model, spec_of, standardise
from skip2fleet.shared.network import ROWS_PER_PASS, Network


class Codec(StrEnum):
    """How a cache stores its rows (fleet.yaml's `training.cache`, a plan's `cache`)."""

    F32 = "f32"
    INT8 = "int8"
    INT4 = "int4"


CODECS = tuple(c.value for c in Codec)  # the names, for choices and messages
LEVELS = {Codec.INT8: 255, Codec.INT4: 15}
GROUP = 128
FLOAT16_MAX = float(np.finfo(np.float16).max)


def groups_of(taps: list[int]) -> np.ndarray:
    """The group of every tap value: runs of at most GROUP values that never cross a tap."""
    ids, first = [], 0
    for width in taps:
        count = -(-width // GROUP)
        ids.append(first + np.arange(width) * count // width)  # `count` near-equal runs
        first += count
    return np.concatenate(ids)


class Cache:
    """The cache rows of a fine-tuning set, stored by one codec."""

    def __init__(
        self, codec: Codec, taps: list[int], n_classes: int, arrays: dict[str, np.ndarray]
    ):
        self.codec, self.taps, self.n_classes = codec, taps, n_classes
        self.width = sum(taps)
        self.arrays = arrays
        self.group = groups_of(taps)
        self.group_sizes = np.bincount(self.group)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales and offsets, logits."""
        return sum(a.nbytes for a in self.arrays.values())

    def gather(self, idx: np.ndarray, out: np.ndarray) -> None:
        """Rows `idx`, dequantized into `out` (len(idx) x (taps + classes), float)."""
        if self.codec == Codec.F32:
            self.arrays["rows"].take(idx, axis=0, out=out, mode="clip")
            return
        taps, a = out[:, : self.width], self.arrays
        codes = a["codes"].take(idx, axis=0, mode="clip")
        if self.codec == Codec.INT4:
            taps[:, 0::2] = codes[:, : (self.width + 1) // 2] & 0x0F
            taps[:, 1::2] = codes[:, : self.width // 2] >> 4
        else:
            taps[...] = codes
        # float16 arithmetic is slow in NumPy: widen the batch's few scales, then spread them
        for name, apply in (("scale", np.multiply), ("offset", np.add)):
            values = a[name].take(idx, axis=0, mode="clip").astype(np.float32)
            apply(taps, np.repeat(values, self.group_sizes, axis=1), out=taps)
        out[:, self.width :] = a["logits"].take(idx, axis=0, mode="clip")

    def decoded(self) -> np.ndarray:
        """Every row dequantized (tests and small sets only: this is the whole cache in f32)."""
        out = np.zeros((len(self), self.width + self.n_classes), np.float32)
        self.gather(np.arange(len(self)), out)
        return out

    def max_error(self) -> np.ndarray:
        """Per sample and tap value, the largest possible dequantization error (half a step)."""
        if self.codec == Codec.F32:
            return np.zeros((len(self), self.width), np.float32)
        return self.arrays["scale"].astype(np.float32)[:, self.group] / 2

    def save(self, handle) -> None:
        np.savez(handle, codec=np.array(self.codec), taps=np.array(self.taps), **self.arrays)

    @classmethod
    def load(cls, path, n_classes: int) -> Cache:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files if k not in ("codec", "taps")}
            return cls(Codec(str(npz["codec"])), [int(t) for t in npz["taps"]], n_classes, arrays)


def build_cache(model: Model, x: np.ndarray, codec: Codec | str = Codec.F32) -> Cache:
    """The cache of raw samples `x` under the frozen base `model`, stored by `codec`."""
    if codec not in CODECS:
        raise FleetError(f"unknown cache codec {codec!r}; choose from {', '.join(CODECS)}")
    codec = Codec(codec)
    spec = spec_of(model)
    network = Network(spec, model)
    x0 = standardise(model, x)
    taps, group = spec.taps(), groups_of(spec.taps())
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(x0), ROWS_PER_PASS):
        z = network.forward(x0[start : start + ROWS_PER_PASS], keep_taps=True)
        rows = np.hstack(network.taps)
        chunk = (
            {"rows": np.hstack([rows, z])}
            if codec == Codec.F32
            else _quantize(rows, z, group, codec)
        )
        for name, array in chunk.items():
            parts.setdefault(name, []).append(array)
    return Cache(codec, taps, spec.n_classes, {k: np.vstack(v) for k, v in parts.items()})


def _quantize(rows: np.ndarray, z: np.ndarray, group: np.ndarray, codec: Codec) -> dict:
    """Codes, float16 scale and offset per group, float16 logits, for a pass of rows."""
    if not np.isfinite(rows).all() or np.abs(rows).max(initial=0) > FLOAT16_MAX / 2:
        raise FleetError("the base's activations are not finite or too large for a quantized cache")
    n_groups = int(group[-1]) + 1
    low = np.full((len(rows), n_groups), np.inf, np.float32)
    high = np.full((len(rows), n_groups), -np.inf, np.float32)
    np.minimum.at(low, (slice(None), group), rows)
    np.maximum.at(high, (slice(None), group), rows)
    # Offsets rounded down and scales up to float16, so every value maps into [0, levels].
    offset = _round_toward(low, -np.inf)
    levels = LEVELS[codec]
    scale = _round_toward((high - offset.astype(np.float32)) / levels, np.inf)
    scale[scale == 0] = 1  # a constant group: every code 0 decodes to the offset exactly
    step = scale.astype(np.float32)[:, group]
    codes = np.rint((rows - offset.astype(np.float32)[:, group]) / step)
    codes = np.clip(codes, 0, levels).astype(np.uint8)
    if codec == Codec.INT4:
        if codes.shape[1] % 2:
            codes = np.hstack([codes, np.zeros((len(codes), 1), np.uint8)])
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"codes": codes, "scale": scale, "offset": offset, "logits": z.astype(np.float16)}


def _round_toward(values: np.ndarray, direction: float) -> np.ndarray:
    """float16 of `values`, rounded toward `direction` (so the float16 bounds the value)."""
    rounded = values.astype(np.float16)
    off = (rounded.astype(np.float32) > values) if direction < 0 else (rounded < values)
    rounded[off] = np.nextafter(rounded[off], np.float16(direction))
    return rounded
