"""A compact, standard feature vector for a 2.56 s window of waist-phone inertial signals.

The paper used UCI's 561 features; this is a documented subset of the same families (UCI's
`mean`, `std`, `min`, `max`, `iqr`-style quantiles, `bandsEnergy` and `correlation`), 110 numbers:

- 8 channels: acceleration x, y, z (g, gravity included), gyroscope x, y, z (rad/s), and the
  magnitudes |acc| and |gyro|;
- per channel, 7 time-domain statistics: mean, standard deviation, minimum, maximum, 25th
  percentile, median, 75th percentile (56);
- per channel, the log energy of the mean-removed signal in 6 frequency bands, 0.3-1, 1-2, 2-3.5,
  3.5-6, 6-10 and 10-25 Hz (48): walking cadence sits near 2 Hz, its harmonics above;
- the correlations between the acceleration axes and between the gyroscope axes (6).
"""

from __future__ import annotations

import numpy as np

RATE_HZ = 50.0
WINDOW = 128
BANDS_HZ = ((0.3, 1.0), (1.0, 2.0), (2.0, 3.5), (3.5, 6.0), (6.0, 10.0), (10.0, 25.01))
N_FEATURES = 8 * 7 + 8 * len(BANDS_HZ) + 6


def window_features(windows: np.ndarray) -> np.ndarray:
    """(N, 128, 6) raw windows -> (N, 110) float32 features."""
    acc, gyro = windows[:, :, :3], windows[:, :, 3:]
    magnitudes = np.stack([np.linalg.norm(acc, axis=2), np.linalg.norm(gyro, axis=2)], axis=2)
    signals = np.concatenate([windows, magnitudes], axis=2).astype(np.float64)
    quantiles = np.percentile(signals, [25, 50, 75], axis=1)
    time_domain = [
        signals.mean(axis=1), signals.std(axis=1), signals.min(axis=1), signals.max(axis=1),
        *quantiles,
    ]  # fmt: skip
    centred = signals - signals.mean(axis=1, keepdims=True)
    power = np.abs(np.fft.rfft(centred, axis=1)) ** 2 / WINDOW
    freqs = np.fft.rfftfreq(WINDOW, d=1.0 / RATE_HZ)
    bands = [
        np.log(power[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) + 1e-6) for lo, hi in BANDS_HZ
    ]
    correlations = [_correlation(signals[:, :, a], signals[:, :, b])
                    for base in (0, 3) for a, b in ((base, base + 1), (base, base + 2),
                                                    (base + 1, base + 2))]  # fmt: skip
    features = np.concatenate([*time_domain, *bands, np.stack(correlations, axis=1)], axis=1)
    return features.astype(np.float32)


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return np.where(denom > 1e-12, (a * b).sum(axis=1) / np.maximum(denom, 1e-12), 0.0)
