"""Generated spectra with a domain shift, so the main command needs no download.

Like the fan task: three machine states, each a 64-bin spectrum with its own peaks. The source
domain is a quiet room; the target domain adds what a noisy room does to a vibration sensor: an
interfering machine's peaks near the states' own, a raised broadband floor, and a coupling gain.
A model trained in the quiet room misreads the noisy one, and a little fine-tuning fixes it.
"""

from __future__ import annotations

import numpy as np

from skip2fleet.shared.datasets import Split, Task

CLASSES = ("normal", "damaged", "stopped")
BINS = 64
PEAKS = {"normal": (10, 20, 30), "damaged": (12, 24, 41), "stopped": ()}


def spectra(
    rng: np.random.Generator, n: int, noise: float, interference: np.ndarray | None
) -> Split:
    """`n` labelled spectra; `noise` scales the room's floor, `interference` is its own spectrum."""
    y = rng.integers(0, len(CLASSES), n)
    bins = np.arange(BINS)
    x = np.abs(rng.normal(0.0, 0.05 + noise, (n, BINS)))
    for label, peaks in enumerate(PEAKS.values()):
        rows = np.flatnonzero(y == label)
        for peak in peaks:
            centre = peak + rng.normal(0, 0.7, (len(rows), 1))
            height = rng.lognormal(0.0, 0.25, (len(rows), 1))
            x[rows] += height * np.exp(-0.5 * ((bins - centre) / 1.2) ** 2)
    if interference is not None:
        x = x * rng.lognormal(0.3, 0.1, (n, 1)) + interference * rng.lognormal(0, 0.2, (n, 1))
    return Split(x.astype(np.float32), y.astype(np.int64))


def noisy_room(rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """The spectrum an interfering machine adds: peaks close to the states' own."""
    bins = np.arange(BINS)
    centres = rng.choice([11, 21, 25, 31, 40], size=3, replace=False) + rng.normal(0, 0.5, 3)
    heights = strength * rng.uniform(0.6, 1.2, 3)
    bumps = np.exp(-0.5 * ((bins[None, :] - centres[:, None]) / 1.5) ** 2)
    return heights @ bumps


def generated_task(seed: int = 0, noise: float = 0.15) -> Task:
    rng = np.random.default_rng([seed, 42])
    room = noisy_room(rng)
    return Task(
        name="generated",
        classes=CLASSES,
        pretrain=spectra(rng, 600, 0.0, None),
        finetune=spectra(rng, 400, noise, room),
        test=spectra(rng, 400, noise, room),
    )
