"""A compact, standard feature vector for a 2.56 s window of waist-phone inertial signals.

The paper used UCI's 561 features; this is a documented subset of the same families (UCI's
`mean`, `std`, `min`, `max`, `iqr`-style quantiles, `bandsEnergy`, `correlation`, and the `Jerk`
signals), 220 numbers:

- 16 channels: acceleration x, y, z (g, gravity included), gyroscope x, y, z (rad/s), their jerks
  (time derivatives, per second), and the magnitudes of the four triaxial signals;
- per channel, 7 time-domain statistics: mean, standard deviation, minimum, maximum, 25th
  percentile, median, 75th percentile (112);
- per channel, the log energy of the mean-removed signal in 6 frequency bands, 0.3-1, 1-2, 2-3.5,
  3.5-6, 6-10 and 10-25 Hz (96): walking cadence sits near 2 Hz, its harmonics above;
- the correlations between the axes of each triaxial signal (12).
"""

from __future__ import annotations

import numpy as np

RATE_HZ = 50.0
WINDOW = 128
BANDS_HZ = ((0.3, 1.0), (1.0, 2.0), (2.0, 3.5), (3.5, 6.0), (6.0, 10.0), (10.0, 25.01))
CHANNELS = 16
N_FEATURES = CHANNELS * 7 + CHANNELS * len(BANDS_HZ) + 12


def window_features(windows: np.ndarray) -> np.ndarray:
    """(N, 128, 6) raw windows (acc xyz, gyro xyz) -> (N, 220) float32 features."""
    raw = windows.astype(np.float64)
    triaxial = [raw[:, :, :3], raw[:, :, 3:]]
    triaxial += [np.gradient(signal, 1.0 / RATE_HZ, axis=1) for signal in triaxial]
    magnitudes = [np.linalg.norm(signal, axis=2, keepdims=True) for signal in triaxial]
    signals = np.concatenate(triaxial + magnitudes, axis=2)
    quantiles = np.percentile(signals, [25, 50, 75], axis=1)
    time_domain = [
        signals.mean(axis=1),
        signals.std(axis=1),
        signals.min(axis=1),
        signals.max(axis=1),
        *quantiles,
    ]
    centred = signals - signals.mean(axis=1, keepdims=True)
    power = np.abs(np.fft.rfft(centred, axis=1)) ** 2 / WINDOW
    freqs = np.fft.rfftfreq(WINDOW, d=1.0 / RATE_HZ)
    bands = [
        np.log(power[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) + 1e-6) for lo, hi in BANDS_HZ
    ]
    correlations = [
        _correlation(signal[:, :, a], signal[:, :, b])
        for signal in triaxial
        for a, b in ((0, 1), (0, 2), (1, 2))
    ]
    features = np.concatenate([*time_domain, *bands, np.stack(correlations, axis=1)], axis=1)
    return features.astype(np.float32)


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return np.where(denom > 1e-12, (a * b).sum(axis=1) / np.maximum(denom, 1e-12), 0.0)
