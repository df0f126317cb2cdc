"""What one fine-tuning step costs: FLOPs by category, and peak memory measured and broken down.

FLOPs come from the products the engine actually calls (`shared.flops`; a multiply-add is 2),
split into forward, input gradient, weight gradient, update and GaLore's SVD (an estimate,
amortised over its refresh interval).

Peak memory is measured as the edge-PEFT study's profiler could not: `tracemalloc` traces from
before the fine-tuner is built (NumPy reports its buffers to it), so its peak over the steps holds
every array alive at their start (weights, trainables, gradients, buffers, data or cache) plus what
the steps allocate. Building the Skip2 cache runs a whole pass of the base and is preparation, not
a step: the peak is reset after it. Beside it, a breakdown by category, counted from the arrays the
fine-tuner holds after a step (shared views counted once); seed 2's analytic peak is likewise a sum
of categories.
"""

from __future__ import annotations

import tracemalloc

import numpy as np

from skip2fleet.shared.engine import FineTuner
from skip2fleet.shared.flops import CATEGORIES, FORWARD, UPDATE, count_flops, phase
from skip2fleet.shared.methods import Method
from skip2fleet.shared.model import SPEC_KEY, Model

MEMORY_STEPS = 2  # the study's profiler ran 2 iterations
MEMORY_CATEGORIES = ("weights", "trainable", "gradients", "optimizer", "activations", "data")


def step_flops(tuner: FineTuner) -> dict[str, int]:
    """FLOPs of one training step by category (`shared.flops.CATEGORIES`), and their total."""
    idx = np.arange(tuner.batch_size)
    with count_flops() as counter:
        with phase(FORWARD):
            tuner.forward(idx)
        with phase("backward"):  # every backward product names its kind; none may land here
            tuner.backward()
        with phase(UPDATE):
            tuner.update(0.0)
    if counter["backward"]:
        raise AssertionError("a backward product was not counted as input or weight gradient")
    split = {name: int(counter[name]) for name in CATEGORIES}
    return {**split, "total": sum(split.values())}


def measure_memory(
    model: Model, method: Method, x: np.ndarray, y: np.ndarray, batch: int, rank: int, codec: str
) -> dict:
    """Peak bytes of fine-tuning at `batch` (measured), and the breakdown by category."""
    tracemalloc.start()
    try:
        tuner = FineTuner(model, method, rank=rank, batch_size=batch)
        tuner.attach(x, y, codec=codec)
        tracemalloc.reset_peak()
        for step in range(MEMORY_STEPS):
            idx = (np.arange(batch) + step * batch) % tuner.samples
            tuner.forward(idx)
            tuner.backward()
            tuner.update(0.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    breakdown = memory_breakdown(tuner)
    return {"batch": batch, "peak_bytes": int(peak), **breakdown}


def memory_breakdown(tuner: FineTuner) -> dict:
    """Bytes per category of the arrays a fine-tuner holds after a step, and their sum."""
    seen: set[int] = set()

    def total(arrays) -> int:
        size = 0
        for array in arrays:
            owner = array if array.base is None else array.base
            if isinstance(owner, np.ndarray) and id(owner) not in seen:
                seen.add(id(owner))
                size += owner.nbytes
        return size

    def held(obj) -> list[np.ndarray]:
        return [v for v in vars(obj).values() if isinstance(v, np.ndarray)]

    # the batch buffers, the skip adapters' products, the group index the cache's gather spreads
    # its scales with, and what each op keeps for backward
    buffers = [
        *(held(tuner.skip) if tuner.skip else []),
        *(held(tuner.cache) if tuner.cache else []),
    ]
    kept = [a for op in tuner.network.every_op() for a in held(op)]
    kept += [a for adapter in tuner.layer_adapters.values() for a in held(adapter)]
    optimizer = held(tuner.optimizer) + list(getattr(tuner.optimizer, "projectors", []))
    data = [tuner.labels, *(tuner.cache.arrays.values() if tuner.cache else [tuner.inputs])]
    sizes = {
        "trainable": total([tuner.theta]),
        "gradients": total([tuner.grad]),
        "weights": total(a for k, a in tuner.model.items() if k != SPEC_KEY),
        "data": total(data),
        "optimizer": total(optimizer),
        "activations": total([tuner.buf, tuner.y, tuner.dz, tuner.rows, *buffers, *kept]),
    }
    return {"memory": {name: sizes[name] for name in MEMORY_CATEGORIES}, "sum": sum(sizes.values())}
