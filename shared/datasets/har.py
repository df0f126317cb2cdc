"""Human activity recognition on the 30 UCI HAR volunteers (the paper's HAR task).

Two formats are read:
- the raw HAPT signals (`hapt_raw.npz`: 50 Hz acc + gyro with per-sample labels, subject and
  recording), cut into UCI's windows, 128 samples with 50 % overlap, never across a recording,
  keeping windows that lie wholly inside one of activities 1-6, and either described by
  `har_features.window_features` (form `features`) or kept raw (form `windows`) as UCI's 9
  "Inertial Signals" channels: body acceleration x, y, z, total acceleration x, y, z (g), gyroscope
  x, y, z (rad/s), channel by channel in a row. Body acceleration is the total minus gravity, and
  gravity is the total low-passed at 0.3 Hz (UCI's cut-off; here an ideal filter, by FFT over each
  whole recording, as UCI filtered whole recordings before windowing); or (form `images`) those 9
  channels as log-spectrograms, 9 x 17 frequencies x 13 frames (`log_spectrogram`);
- the published UCI HAR layout (`train/X_train.txt`, `y_train.txt`, `subject_train.txt` and the
  same under `test/`), its 561 features as they are.

Split: pretrain on every subject outside the target group; for each target subject, recording and
activity, the first 60 % of its windows in time order are fine-tuned on and the rest tested on, one
window left out between them so that no sample is in both. Per recording, because each HAPT subject
was recorded twice with the phone in different places (on the left of the belt, then where the
subject chose): a device's held-out data should come from the same sessions as its training data,
not from a placement it barely saw.
"""

from __future__ import annotations

import dataclasses
import itertools
import zipfile
from pathlib import Path

import numpy as np

from skip2fleet.shared.datasets import Split, Task
from skip2fleet.shared.datasets.har_features import RATE_HZ, WINDOW, window_features
from skip2fleet.shared.errors import DataError

CLASSES = ("walking", "upstairs", "downstairs", "sitting", "standing", "laying")
RAW_FILE = "hapt_raw.npz"
FINETUNE_SHARE = 0.6
SKIP_BYTES = 1 << 20
CHUNK = 64  # windows featurised at once: 1 MB per float64 temporary (256: +14 MB peak)
CHANNELS = 9  # of a raw window: body acc xyz, total acc xyz, gyro xyz
GRAVITY_HZ = 0.3
STFT_FRAME, STFT_HOP = 32, 8  # the images form: 0.64 s frames every 0.16 s
FREQUENCIES, FRAMES = STFT_FRAME // 2 + 1, (WINDOW - STFT_FRAME) // STFT_HOP + 1
POWER_FLOOR = 1e-6  # (g or rad/s)^2: keeps the log finite where a channel is flat


def load_har_task(folder: Path, subjects: tuple[int, ...], form: str = "features") -> Task:
    return _shaped(split_by_subject(*har_windows(folder, None, form), subjects), form)


def load_har_subject(folder: Path, subject: int, form: str = "features") -> Task:
    """One subject's fine-tune and test split only (no pretraining split): what a device reads."""
    return _shaped(split_by_subject(*har_windows(folder, (subject,), form), (subject,)), form)


def _shaped(task: Task, form: str) -> Task:
    shapes = {"windows": (CHANNELS, WINDOW), "images": (CHANNELS, FREQUENCIES, FRAMES)}
    return dataclasses.replace(task, shape=shapes[form]) if form in shapes else task


def har_windows(
    folder: Path, only: tuple[int, ...] | None = None, form: str = "features"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Samples, activity (0-5), subject and recording of the windows (of the `only` subjects).

    The UCI layout does not say which recording a window is from: each subject counts as one."""
    if (folder / RAW_FILE).is_file():
        return raw_windows(folder / RAW_FILE, only, form)
    if form != "features":
        raise DataError(f"{folder}: HAR {form} need the raw signals, {RAW_FILE}")
    if (folder / "train" / "X_train.txt").is_file():
        features, labels, subject = read_uci_layout(folder)
        keep = np.isin(subject, only) if only is not None else slice(None)
        return features[keep], labels[keep], subject[keep], subject[keep]
    raise DataError(
        f"{folder}: no HAR data (expected {RAW_FILE} or the UCI layout train/X_train.txt)"
    )


def raw_windows(
    path: Path, only: tuple[int, ...] | None = None, form: str = "features"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Samples, activity (0-5), subject and recording of every clean window of the raw signals.

    With `only`, just those subjects' rows of the signals are read from the archive, so a device
    holds its own recordings (about 1 MB) rather than everyone's (27 MB); windows are featurised
    in chunks so that memory stays bounded either way."""
    try:
        with zipfile.ZipFile(path) as archive:
            subject = _npy_rows(archive, "subject")
            keep = np.isin(subject, only) if only is not None else np.ones(len(subject), bool)
            edges = np.flatnonzero(np.diff(np.r_[0, keep.astype(np.int8), 0]))
            runs = list(zip(edges[::2], edges[1::2], strict=True))
            if not runs:
                raise DataError(f"{path}: no recordings of subject(s) {list(only or [])}")
            signals = _npy_rows(archive, "signals", runs)
            labels, recording = (
                _npy_rows(archive, "labels")[keep],
                _npy_rows(archive, "experiment")[keep],
            )
            subject = subject[keep]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable HAPT npz ({exc})") from None
    n = len(signals)
    if signals.ndim != 2 or signals.shape[1] != 6 or not len(labels) == len(recording) == n:
        raise DataError(f"{path}: expected signals (N x 6) and labels, subject, experiment of N")
    finite = np.isfinite(signals).all(axis=1)
    if not finite.all():
        raise DataError(f"{path}: a signals row of subject {subject[~finite][0]} holds NaN or Inf")
    starts = []
    bounds = np.flatnonzero(np.diff(recording)) + 1
    for begin, end in zip(np.r_[0, bounds], np.r_[bounds, n], strict=True):
        starts.append(np.arange(begin, end - WINDOW + 1, WINDOW // 2))
    starts = np.concatenate(starts)
    window_labels = np.lib.stride_tricks.sliding_window_view(labels, WINDOW)[starts]
    first = window_labels[:, 0]
    clean = (window_labels == first[:, None]).all(axis=1) & (first >= 1) & (first <= 6)
    starts = starts[clean]
    if form == "windows":
        channels = inertial_channels(signals, np.r_[0, bounds, n])
        windows = np.lib.stride_tricks.sliding_window_view(channels, WINDOW, axis=0)
        features = windows[starts].reshape(len(starts), -1).astype(np.float32)
    elif form == "images":
        channels = inertial_channels(signals, np.r_[0, bounds, n])
        windows = np.lib.stride_tricks.sliding_window_view(channels, WINDOW, axis=0)
        features = np.concatenate(
            [log_spectrogram(windows[starts[i : i + CHUNK]]) for i in range(0, len(starts), CHUNK)]
        )
    else:
        windows = np.lib.stride_tricks.sliding_window_view(signals, WINDOW, axis=0)
        features = np.concatenate(
            [
                window_features(windows[starts[i : i + CHUNK]].transpose(0, 2, 1))
                for i in range(0, len(starts), CHUNK)
            ]
        )
    return (
        features,
        first[clean].astype(np.int64) - 1,
        subject[starts].astype(np.int64),
        recording[starts].astype(np.int64),
    )


def log_spectrogram(windows: np.ndarray) -> np.ndarray:
    """(N, 9, 128) windows -> (N, 9 * 17 * 13) rows: per channel, the log power of a short-time
    Fourier transform (Hann frames of 32 samples every 8: 17 frequencies from 0 to 25 Hz by
    13 frames in time), channel-major, frequency before time."""
    frames = np.lib.stride_tricks.sliding_window_view(windows, STFT_FRAME, axis=2)[
        ..., ::STFT_HOP, :
    ]
    spectrum = np.fft.rfft(frames * np.hanning(STFT_FRAME), axis=-1)
    power = np.log(np.abs(spectrum) ** 2 + POWER_FLOOR)  # (N, 9, frames, frequencies)
    return power.transpose(0, 1, 3, 2).reshape(len(windows), -1).astype(np.float32)


def inertial_channels(signals: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(N, 6) acc + gyro -> (N, 9) body acc, total acc, gyro; recordings end at `edges`."""
    total = signals[:, :3].astype(np.float64)
    gravity = np.empty_like(total)
    for begin, end in itertools.pairwise(edges):
        spectrum = np.fft.rfft(total[begin:end], axis=0)
        spectrum[np.fft.rfftfreq(end - begin, 1.0 / RATE_HZ) > GRAVITY_HZ] = 0
        gravity[begin:end] = np.fft.irfft(spectrum, n=end - begin, axis=0)
    return np.hstack([total - gravity, total, signals[:, 3:]]).astype(np.float32)


def _npy_rows(
    archive: zipfile.ZipFile, name: str, runs: list[tuple[int, int]] | None = None
) -> np.ndarray:
    """Rows [begin, end) of each run of the array `name` in an .npz, read without the rest."""
    with archive.open(f"{name}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(handle)
        if fortran:
            raise ValueError(f"{name} is stored in Fortran order")
        row_bytes = dtype.itemsize * int(np.prod(shape[1:]))
        position, parts = 0, []
        for begin, end in runs or [(0, shape[0])]:
            # Skip forward in small reads: zipfile's seek decompresses 16 MB at a time.
            while position < begin * row_bytes:
                position += len(handle.read(min(SKIP_BYTES, begin * row_bytes - position)))
            data = handle.read((int(end) - int(begin)) * row_bytes)
            position += len(data)
            if len(data) != (end - begin) * row_bytes:
                raise ValueError(f"{name} is truncated")
            parts.append(np.frombuffer(data, dtype).reshape(-1, *shape[1:]))
        return np.concatenate(parts)


def read_uci_layout(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, activity (0-5) and subject of the published UCI HAR files, train then test."""
    parts = []
    for part in ("train", "test"):
        if not (folder / part / f"X_{part}.txt").is_file():
            continue
        x = _read_table(folder / part / f"X_{part}.txt")
        y = _read_table(folder / part / f"y_{part}.txt").ravel().astype(np.int64)
        s = _read_table(folder / part / f"subject_{part}.txt").ravel().astype(np.int64)
        if not len(x) == len(y) == len(s):
            raise DataError(f"{folder / part}: X, y and subject files differ in length")
        if y.min() < 1 or y.max() > 6:
            raise DataError(f"{folder / part / f'y_{part}.txt'}: activities must be 1 to 6")
        parts.append((x, y - 1, s))
    if len({p[0].shape[1] for p in parts}) > 1:
        raise DataError(f"{folder}: train and test have different numbers of features")
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def _read_table(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        widths = {len(row) for row in rows}
        if len(widths) != 1:
            raise DataError(f"{path}: rows have different numbers of values ({sorted(widths)})")
        table = np.array(rows, dtype=np.float64)
    except ValueError:
        raise DataError(f"{path}: not a whitespace-separated numeric table") from None
    if not np.all(np.isfinite(table)):
        raise DataError(
            f"{path}: row {int(np.flatnonzero(~np.isfinite(table).all(1))[0])} holds NaN or Inf"
        )
    return table


def split_by_subject(
    features: np.ndarray,
    labels: np.ndarray,
    subject: np.ndarray,
    recording: np.ndarray,
    targets: tuple[int, ...],
) -> Task:
    """Pretrain on the other subjects; fine-tune/test 60/40 per target recording and activity."""
    missing = sorted(set(targets) - set(subject.tolist()))
    if missing:
        raise DataError(f"HAR data has no windows of subject(s) {missing}")
    in_target = np.isin(subject, targets)
    tune, test = [], []
    for session in np.unique(recording[in_target]):
        for activity in range(len(CLASSES)):
            rows = np.flatnonzero(in_target & (recording == session) & (labels == activity))
            cut = round(FINETUNE_SHARE * len(rows))
            tune.append(rows[:cut])
            test.append(rows[cut + 1 :])
    tune, test = np.sort(np.concatenate(tune)), np.sort(np.concatenate(test))

    def pick(rows: np.ndarray) -> Split:
        return Split(features[rows].astype(np.float32), labels[rows])

    return Task(
        name="har",
        classes=CLASSES,
        pretrain=pick(np.flatnonzero(~in_target)),
        finetune=pick(tune),
        test=pick(test),
    )
