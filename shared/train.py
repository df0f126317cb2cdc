"""The fine-tuning loop: seeded shuffled mini-batches, plain SGD, and a timing split per phase.

Timing accumulates four `perf_counter` reads per step into running sums (about 0.1 us each); nothing
is logged per step. The last incomplete batch of an epoch is dropped (the next epoch reshuffles, so
every sample is still seen) so that every step has the same shape and cost.

The optimizer is plain SGD with a constant learning rate: two NumPy calls per step for any method,
no optimizer state to store, what a microcontroller-class device can afford, and the same for every
method so that the timing comparison is fair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter

import numpy as np

from skip2fleet.shared.cache import Cache, Codec
from skip2fleet.shared.engine import FineTuner
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.methods import Method
from skip2fleet.shared.model import Model
from skip2fleet.shared.peft.galore import INTERVAL, SCALE


@dataclass(frozen=True, kw_only=True)
class FineTuneConfig:
    epochs: int = 600  # the paper's
    batch_size: int = 20
    rank: int = 4
    lr: float = 0.01  # chosen on a validation quarter of the fine-tune splits, never the test
    seed: int = 0
    galore_interval: int = INTERVAL  # GaLore: steps between projector refreshes (SVDs)
    galore_scale: float = SCALE  # GaLore: the projected step's scale
    cache: Codec = Codec.F32  # Skip2-LoRA: the cache's codec (shared.cache)


@dataclass
class StepTimes:
    """Seconds summed over `steps` training steps, per phase."""

    forward: float = 0.0
    backward: float = 0.0
    update: float = 0.0
    steps: int = 0

    def per_batch_ms(self) -> dict[str, float]:
        n = max(self.steps, 1)
        split = {
            "forward": 1e3 * self.forward / n,
            "backward": 1e3 * self.backward / n,
            "update": 1e3 * self.update / n,
        }
        return {**split, "total": sum(split.values())}


@dataclass
class FineTuneResult:
    tuner: FineTuner
    times: StepTimes = field(default_factory=StepTimes)
    prepare_seconds: float = 0.0  # attaching the data: building the Skip2 cache, if any
    train_seconds: float = 0.0

    @property
    def cache_bytes(self) -> int:
        """Bytes of the Skip2 cache (every tap and the base logits per sample); 0 without one."""
        return 0 if self.tuner.cache is None else self.tuner.cache.nbytes


def finetune(
    model: Model,
    method: Method,
    x: np.ndarray,
    y: np.ndarray,
    config: FineTuneConfig = FineTuneConfig(),
    cache: Cache | None = None,
    on_epoch: Callable[[int], None] | None = None,
    start: np.ndarray | None = None,
) -> FineTuneResult:
    """Fine-tune `method` from the base `model` on raw features `x` and labels `y`; `start`
    continues from earlier trainable values (a flat `theta`) instead of a fresh init."""
    tuner = fine_tuner(model, method, config, len(y))
    if start is not None:
        tuner.load(start)
    started = perf_counter()
    tuner.attach(x, y, cache, config.cache)
    result = FineTuneResult(tuner, prepare_seconds=perf_counter() - started)
    train_epochs(result, config.epochs, config.lr, config.seed, on_epoch)
    result.train_seconds = perf_counter() - started - result.prepare_seconds
    return result


def fine_tuner(model: Model, method: Method, config: FineTuneConfig, samples: int) -> FineTuner:
    """The engine set up as `config` says, for a set of `samples`."""
    return FineTuner(
        model,
        method,
        rank=config.rank,
        batch_size=min(config.batch_size, samples),
        seed=config.seed,
        galore_interval=config.galore_interval,
        galore_scale=config.galore_scale,
    )


def train_epochs(
    result: FineTuneResult,
    epochs: int,
    lr: float,
    seed: int,
    on_epoch: Callable[[int], None] | None = None,
) -> None:
    """Run `epochs` epochs of SGD on the attached data, adding to `result.times`.

    Overflow is not warned about per step; a diverged run is caught once per epoch instead.
    """
    tuner, times = result.tuner, result.times
    batch = tuner.batch_size
    n = tuner.samples
    order = np.random.default_rng([seed, 2])
    forward, backward, update = tuner.forward, tuner.backward, tuner.update
    clock = perf_counter
    for epoch in range(epochs):
        perm = order.permutation(n)
        fwd = bwd = upd = 0.0
        steps = 0
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, n - batch + 1, batch):
                idx = perm[start : start + batch]
                t0 = clock()
                forward(idx)
                t1 = clock()
                backward()
                t2 = clock()
                update(lr)
                t3 = clock()
                fwd += t1 - t0
                bwd += t2 - t1
                upd += t3 - t2
                steps += 1
        times.forward += fwd
        times.backward += bwd
        times.update += upd
        times.steps += steps
        if not np.isfinite(tuner.theta).all():
            raise FleetError(
                f"{tuner.method.name} diverged in epoch {epoch + 1} at learning rate {lr}; "
                "lower --lr"
            )
        if on_epoch is not None:
            on_epoch(epoch)
