"""Data loaders on tiny fixtures in the real formats, their bad-input errors, and the real data."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.shared.datasets import TaskOptions, load_task, parse_subjects
from skip2fleet.shared.datasets.digits import thicker_pen
from skip2fleet.shared.datasets.fan import read_recording, stopped_from
from skip2fleet.shared.datasets.har import read_uci_layout, split_by_subject
from skip2fleet.shared.datasets.har_features import N_FEATURES, window_features
from skip2fleet.shared.errors import DataError, FleetError


def spectrum_csv(amplitudes: np.ndarray) -> str:
    return "".join(f"{i}, {a:.6f}\n" for i, a in enumerate(amplitudes))


def write_recording(folder: Path, stem: str, levels: list[float], packed: bool) -> None:
    """A recording whose spectra have the given overall levels, as upstream lays it out."""
    rng = np.random.default_rng(len(stem))
    files = {
        f"{stem}/2022-02-10-05-{i // 60:02d}-{i % 60:02d}.csv": spectrum_csv(
            level * (1 + 0.05 * rng.random(512))
        )
        for i, level in enumerate(levels)
    }
    if packed:
        with zipfile.ZipFile(folder / f"{stem}.zip", "w") as archive:
            for name, text in files.items():
                archive.writestr(name, text)
    else:
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)


HMLO = [0.1] * 10 + [0.07] * 10 + [0.05] * 10 + [0.01] * 10  # h, m, l, then off from index 30


def make_fan_folder(folder: Path, packed: bool = True) -> Path:
    for damage in ("normal", "damage1"):
        for room in ("silentA", "noisy"):
            for take in (1, 2):
                write_recording(folder, f"12cm_hmlo_{damage}_{room}_{take}", HMLO, packed)
    return folder


@pytest.mark.parametrize("packed", [True, False], ids=["zips", "unpacked"])
def test_fan_task_reads_zips_and_folders(tmp_path, packed):
    task = load_task("fan-damage1", TaskOptions(make_fan_folder(tmp_path, packed)))
    assert task.n_features == 256
    for split in (task.pretrain, task.finetune, task.test):
        assert len(split) == 80
        # normal recording first: running (0) until the fan stops (2) at index 30, then damaged
        np.testing.assert_array_equal(split.y, [0] * 30 + [2] * 10 + [1] * 30 + [2] * 10)


def test_stopped_boundary_is_found_from_the_energy_drop():
    spectra = np.array([[level] * 512 for level in HMLO])
    assert stopped_from(spectra) == 30


def test_fan_missing_recording_is_named(tmp_path):
    make_fan_folder(tmp_path)
    (tmp_path / "12cm_hmlo_damage1_noisy_2.zip").unlink()
    with pytest.raises(DataError, match=r"recording 12cm_hmlo_damage1_noisy_2 is missing"):
        load_task("fan-damage1", TaskOptions(tmp_path))


def test_fan_truncated_zip_is_named(tmp_path):
    make_fan_folder(tmp_path)
    path = tmp_path / "12cm_hmlo_normal_noisy_1.zip"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"12cm_hmlo_normal_noisy_1\.zip: not a readable zip"):
        load_task("fan-damage1", TaskOptions(tmp_path))


def test_fan_csv_with_wrong_bins_is_named(tmp_path):
    make_fan_folder(tmp_path, packed=False)
    victim = sorted((tmp_path / "12cm_hmlo_damage1_silentA_1").glob("*.csv"))[3]
    victim.write_text(spectrum_csv(np.ones(300)))
    with pytest.raises(DataError, match=rf"{victim.name}: 300 bins, expected 512"):
        read_recording(tmp_path, "12cm_hmlo_damage1_silentA_1")


def test_fan_csv_with_nan_is_named(tmp_path):
    make_fan_folder(tmp_path, packed=False)
    victim = sorted((tmp_path / "12cm_hmlo_normal_silentA_1").glob("*.csv"))[0]
    amplitudes = np.ones(512)
    amplitudes[17] = np.nan
    victim.write_text(spectrum_csv(amplitudes))
    with pytest.raises(DataError, match=rf"{victim.name}: amplitude of bin 17 is NaN"):
        load_task("fan-damage1", TaskOptions(tmp_path))


def test_missing_data_folder_and_unknown_task(tmp_path):
    with pytest.raises(DataError, match="does-not-exist: data folder does not exist"):
        load_task("har", TaskOptions(tmp_path / "does-not-exist"))
    with pytest.raises(FleetError, match="unknown dataset 'mnist'"):
        load_task("mnist")
    with pytest.raises(FleetError, match="subjects are numbered 1 to 30"):
        parse_subjects("9,31")


def write_uci(folder: Path, rows_per_subject: int = 24, n_features: int = 561) -> None:
    rng = np.random.default_rng(0)
    for part, subjects in (("train", (1, 3)), ("test", (2,))):
        (folder / part).mkdir(parents=True)
        s = np.repeat(subjects, rows_per_subject)
        y = np.tile(
            np.repeat(np.arange(1, 7), -(-rows_per_subject // 6))[:rows_per_subject], len(subjects)
        )
        x = rng.uniform(-1, 1, (len(s), n_features))
        np.savetxt(folder / part / f"X_{part}.txt", x, fmt="%.7e")
        np.savetxt(folder / part / f"y_{part}.txt", y, fmt="%d")
        np.savetxt(folder / part / f"subject_{part}.txt", s, fmt="%d")


def test_uci_har_layout_is_read_and_split(tmp_path):
    write_uci(tmp_path)
    features, labels, subject = read_uci_layout(tmp_path)
    assert features.shape == (72, 561)
    assert sorted(set(subject.tolist())) == [1, 2, 3]
    assert labels.min() == 0 and labels.max() == 5
    task = load_task("har", TaskOptions(tmp_path, subjects=(2,)))
    assert len(task.pretrain) == 48  # subjects 1 and 3
    assert (len(task.finetune), len(task.test)) == (12, 6)  # 4 per activity: 2, gap, 1
    assert not set(map(bytes, task.finetune.x)) & set(map(bytes, task.test.x))


def test_uci_har_with_ragged_rows_is_named(tmp_path):
    write_uci(tmp_path)
    path = tmp_path / "train" / "X_train.txt"
    lines = path.read_text().splitlines()
    lines[5] = " ".join(lines[5].split()[:100])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"X_train\.txt: rows have different numbers of values"):
        read_uci_layout(tmp_path)


def test_split_is_sixty_forty_in_time_order_per_recording_and_activity():
    labels = np.tile(np.repeat([0, 1], 50), 2)
    recording = np.repeat([3, 4], 100)
    subject = np.ones(200, int)
    features = np.arange(200, dtype=np.float32)[:, None]
    task = split_by_subject(features, labels, subject, recording, (1,))
    assert len(task.finetune) == 120 and len(task.test) == 76
    for session in (3, 4):  # both recordings are in both splits, the test part always later
        for activity in (0, 1):
            rows = features[(recording == session) & (labels == activity), 0]
            tuned = np.intersect1d(task.finetune.x[:, 0], rows)
            tested = np.intersect1d(task.test.x[:, 0], rows)
            assert len(tuned) == 30 and len(tested) == 19 and tuned.max() + 1 < tested.min()


def test_window_features_are_finite_and_describe_the_signal():
    rng = np.random.default_rng(0)
    t = np.arange(128) / 50.0
    walking = np.zeros((1, 128, 6))
    walking[0, :, 2] = 1 + 0.3 * np.sin(2 * np.pi * 1.8 * t)  # gravity on z, 1.8 Hz cadence
    still = np.zeros((1, 128, 6))
    still[0, :, 2] = 1 + 0.001 * rng.normal(size=128)
    features = window_features(np.concatenate([walking, still]))
    assert features.shape == (2, N_FEATURES) == (2, 220)
    assert np.isfinite(features).all()
    std_of_acc_z = 16 + 2  # time-domain block: means of 16 channels, then stds; z is channel 2
    assert features[0, std_of_acc_z] > 100 * features[1, std_of_acc_z]


def test_generated_task_has_a_domain_shift():
    task = load_task("generated")
    assert task.n_features == 64 and task.classes == ("normal", "damaged", "stopped")
    assert abs(task.finetune.x.mean() - task.pretrain.x.mean()) > 0.1


# -- the real data sets (CI points FLEET_DATA_DIR at ../shared/data) ------------------------------


@pytest.mark.parametrize("name", ["fan-damage1", "fan-damage2"])
def test_real_fan_tasks_have_the_papers_split_sizes(data_dir, name):
    task = load_task(name, TaskOptions(data_dir))
    for split in (task.pretrain, task.finetune, task.test):
        assert len(split) == 470 and split.x.shape[1] == 256
        stopped = np.mean(split.y == 2)
        assert 0.22 < stopped < 0.26  # the fan-off step: about the last quarter of each recording


def test_real_har_task(data_dir):
    task = load_task("har", TaskOptions(data_dir))
    assert task.n_features == N_FEATURES
    assert set(np.unique(task.finetune.y)) == set(range(6))
    share = len(task.finetune) / (len(task.finetune) + len(task.test))
    assert 0.57 < share < 0.63
    assert len(task.pretrain) > 5 * len(task.finetune)


def test_real_data_as_windows_are_the_same_samples(data_dir):
    """HAR as raw 9 x 128 windows, fan as 1 x 256: the samples, labels and splits of the
    feature form."""
    for name, shape in (("har", (9, 128)), ("fan-damage1", (1, 256))):
        features = load_task(name, TaskOptions(data_dir))
        windows = load_task(name, TaskOptions(data_dir, form="windows"))
        assert windows.input_shape == shape and features.input_shape == (features.n_features,)
        for split in ("pretrain", "finetune", "test"):
            a, b = getattr(features, split), getattr(windows, split)
            np.testing.assert_array_equal(a.y, b.y)
            assert b.x.shape == (len(a), shape[0] * shape[1])
    fan = load_task("fan-damage1", TaskOptions(data_dir))
    np.testing.assert_array_equal(fan.test.x, windows.test.x)
    har = load_task("har", TaskOptions(data_dir, form="windows")).pretrain.x.reshape(-1, 9, 128)
    body, total = har[:, :3].mean(axis=(0, 2)), har[:, 3:6].mean(axis=(0, 2))
    assert np.abs(body).max() < 0.01 and np.linalg.norm(total) > 0.8  # gravity (g) left the body


@pytest.mark.parametrize("form", ["windows", "images"])
def test_windows_and_images_need_the_raw_har_signals(tmp_path, form):
    write_uci(tmp_path)
    with pytest.raises(DataError, match=f"HAR {form} need the raw signals"):
        load_task("har", TaskOptions(tmp_path, subjects=(2,), form=form))


def test_hapt_import_rebuilds_the_archive_from_ucis_raw_layout(tmp_path, data_dir):
    """Two recordings written out as UCI ships them (RawData/acc_exp01_user01.txt, ..., labels.txt)
    come back as the same rows of hapt_raw.npz."""
    archive = np.load(data_dir / "hapt" / "hapt_raw.npz")
    raw = tmp_path / "RawData"
    raw.mkdir()
    stretches = []
    for experiment in (0, 1):
        rows = archive["experiment"] == experiment
        user = int(archive["subject"][rows][0])
        stem = f"exp{experiment + 1:02d}_user{user:02d}.txt"
        signals = archive["signals"][rows]
        np.savetxt(raw / f"acc_{stem}", signals[:, :3], fmt="%.9g")
        np.savetxt(raw / f"gyro_{stem}", signals[:, 3:], fmt="%.9g")
        labels = archive["labels"][rows]
        edges = np.flatnonzero(np.diff(labels.astype(int))) + 1
        for first, last in zip(np.r_[0, edges], np.r_[edges, len(labels)] - 1, strict=True):
            if labels[first] > 0:
                stretches.append((experiment + 1, user, labels[first], first, last))
    np.savetxt(raw / "labels.txt", np.array(stretches), fmt="%d")
    out = tmp_path / "hapt" / "hapt_raw.npz"
    result = CliRunner().invoke(app, ["data", "import-hapt", str(raw), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rebuilt = np.load(out)
    rows = archive["experiment"] < 2
    for name in ("signals", "labels", "subject", "experiment"):
        assert rebuilt[name].dtype == archive[name].dtype
        np.testing.assert_array_equal(rebuilt[name], archive[name][rows])
    (raw / "labels.txt").write_text("1 1 5 0\n")
    result = CliRunner().invoke(app, ["data", "import-hapt", str(raw), "--out", str(out)])
    assert result.exit_code == 2
    assert "labels.txt: 4 columns, expected 5" in result.output


def test_har_images_are_log_spectrograms_of_the_same_windows(data_dir):
    """The images form: each window's 9 channels as 17 frequencies x 13 frames of log power,
    the same samples, labels and splits; a frame's power is its 32 samples' Hann-windowed FFT."""
    windows = load_task("har", TaskOptions(data_dir, form="windows"))
    images = load_task("har", TaskOptions(data_dir, form="images"))
    assert images.input_shape == (9, 17, 13)
    for split in ("pretrain", "finetune", "test"):
        np.testing.assert_array_equal(getattr(images, split).y, getattr(windows, split).y)
    raw = windows.test.x[5].reshape(9, 128)
    image = images.test.x[5].reshape(9, 17, 13)
    frame = raw[4, 3 * 8 : 3 * 8 + 32] * np.hanning(32)  # channel 4, frame 3
    power = np.abs(np.fft.rfft(frame)) ** 2
    np.testing.assert_allclose(image[4, :, 3], np.log(power + 1e-6), rtol=1e-4, atol=1e-4)


def test_digits_target_domain_is_a_thicker_pen_one_pixel_lower():
    """scikit-learn's digits: half the images as they are (source), half drawn synthetically
    with another pen (target); the feature and image forms hold the same values."""
    features = load_task("digits")
    images = load_task("digits", TaskOptions(form="images"))
    assert images.input_shape == (1, 8, 8) and features.input_shape == (64,)
    np.testing.assert_array_equal(features.finetune.x, images.finetune.x)
    assert len(features.pretrain) == 898 and len(features.finetune) + len(features.test) == 899
    square = np.zeros((1, 64), np.float32)
    square[0, 8 * 2 + 3] = 16  # one dot at row 2, column 3
    shifted = thicker_pen(square).reshape(8, 8)
    assert set(zip(*np.nonzero(shifted), strict=True)) == {(3, 3), (3, 4)}
    with pytest.raises(FleetError, match="fan-damage1 has no images form; images: har, digits"):
        load_task("fan-damage1", TaskOptions(form="images"))
