"""A user's own samples: the folder format, `fleet data check`, a device's round on them, the
accept rule and versions, `fleet predict` and `fleet rollback`, and every bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.client.clientapp import run_round
from skip2fleet.client.model import load_device_model
from skip2fleet.client.store import KEEP_VERSIONS, DeviceStore
from skip2fleet.server.training.pretraining import pretrain_shown
from skip2fleet.shared import model as base_model
from skip2fleet.shared.config import ConfigError, parse_config
from skip2fleet.shared.datasets import load_task
from skip2fleet.shared.datasets.samples import (
    device_samples,
    holdout_mask,
    read_blocks,
    source_task,
)
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.protocol import Figures, Part
from skip2fleet.shared.records import adapters_record
from tests.test_device import content

runner = CliRunner()
TASK = load_task("generated")
NAMES = np.array(TASK.classes)
W = TASK.n_features
SORTED = sorted(TASK.classes)  # a source folder's names become the base's classes, sorted


def fleet(*args: str, stdin: str | None = None):
    return runner.invoke(app, list(args), input=stdin, catch_exceptions=False)


def write_csv(path: Path, x: np.ndarray, labels, label_column: str = "label") -> Path:
    with open(path, "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow([f"f{i}" for i in range(x.shape[1])] + [label_column])
        for row, label in zip(x, labels, strict=True):
            out.writerow([*row.tolist(), label])
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A source folder (names in an .npz) and a device folder (a CSV with names, an .npz with
    indices), and a base pretrained on the source."""
    root = tmp_path_factory.mktemp("own")
    (root / "source").mkdir()
    (root / "device").mkdir()
    np.savez(root / "source" / "a.npz", x=TASK.pretrain.x, y=NAMES[TASK.pretrain.y])
    half = len(TASK.finetune) // 2
    write_csv(root / "device" / "1.csv", TASK.finetune.x[:half], NAMES[TASK.finetune.y[:half]])
    indices = [SORTED.index(name) for name in NAMES[TASK.finetune.y[half:]]]
    np.savez(root / "device" / "2.npz", x=TASK.finetune.x[half:], y=np.array(indices))
    base = pretrain_shown(source_task(root / "source", "label", 0.25, "features"), "mlp", 5, 0)
    base_model.save(base, root / "base.npz")
    return root, base


def test_holdout_is_every_fourth_of_a_class_and_stable_when_files_are_added():
    y = np.array([0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0])
    mask = holdout_mask(y, 0.25)
    assert np.flatnonzero(mask).tolist() == [4, 7, 11]  # 4th and 8th 0, 4th 1
    longer = holdout_mask(np.concatenate([y, [1, 0, 1]]), 0.25)
    assert np.array_equal(longer[: len(y)], mask)


def test_the_base_keeps_the_source_class_names(folders):
    _, base = folders
    assert base_model.classes_of(base) == tuple(SORTED)


def test_a_device_trains_on_its_folder_and_predicts_with_the_active_model(folders, tmp_path):
    root, base = folders
    node = {"device": "a", "state-dir": str(tmp_path / "state")}
    paths = [str(root / "device"), ""]
    reply = run_round(content(base, data_paths=paths), node)
    figures = Figures.from_record(reply[Part.FIGURES])
    held = holdout_mask(TASK.finetune.y, 0.25).sum()
    assert figures.samples == len(TASK.finetune) - held
    assert figures.accepted == 1 and figures.acc_after > figures.acc_before
    model = load_device_model(tmp_path / "state")
    assert model.round == 1 and model.active.base_sha256 == base_model.sha256(base)
    p = model.predict(TASK.test.x)
    assert p.shape == (len(TASK.test), 3) and np.allclose(p.sum(axis=1), 1)
    assert base_model.accuracy(np.log(p), np.searchsorted(SORTED, NAMES[TASK.test.y])) > 80


def bad_aggregate(base, rank: int = 4) -> np.ndarray:
    """Adapters from a "fleet aggregate" that wreck this device's predictions."""
    size = layout(get_method("skip2-lora"), base_model.spec_of(base), rank).size
    return np.random.default_rng(3).normal(0, 5, size).astype(np.float32)


def test_worse_adapters_are_not_made_active(folders, tmp_path):
    """A round that starts from a bad aggregate and barely trains is worse than the device's
    own adapters: they stay active, and the reply says so."""
    root, base = folders
    node = {"device": "a", "state-dir": str(tmp_path)}
    paths = [str(root / "device"), ""]
    run_round(content(base, data_paths=paths), node)
    store = DeviceStore(tmp_path)
    before = store.active()
    worse = content(base, 2, False, data_paths=paths, lr=1e-6, epochs=1)
    bad = bad_aggregate(base)
    worse[Part.ADAPTERS] = adapters_record(bad, bad.size)
    reply = run_round(worse, node)
    figures = Figures.from_record(reply[Part.FIGURES])
    assert figures.accepted == 0 and figures.acc_after < figures.acc_active
    assert Part.ADAPTERS not in reply  # adapters its own hold-out rejected never leave it
    assert figures.acc_active == pytest.approx(before.accuracy)
    assert store.active() == before
    assert np.array_equal(
        store.load_adapters(
            before.base_sha256,
            "skip2-lora",
            4,
            layout(get_method("skip2-lora"), base_model.spec_of(base), 4).size,
        ),
        store.version_theta(before.version),
    )  # the next round continues it
    # with accept: always, the same round is made active
    always = content(base, 3, False, data_paths=paths, lr=1e-6, epochs=1, accept="always")
    always[Part.ADAPTERS] = adapters_record(bad, bad.size)
    assert Figures.from_record(run_round(always, node)[Part.FIGURES]).accepted == 1
    assert store.active().version.round == 3


def test_adapters_saved_in_another_layout_are_named_and_a_round_starts_afresh(folders, tmp_path):
    """Adapters an older skip2fleet saved with another layout (another size): `fleet predict`
    names them; the next round neither continues from them nor keeps them active."""
    root, base = folders
    node = {"device": "a", "state-dir": str(tmp_path)}
    paths = [str(root / "device"), ""]
    run_round(content(base, data_paths=paths), node)
    store = DeviceStore(tmp_path)
    digest = store.active().base_sha256
    stale = np.zeros(7, np.float32)
    store.save_adapters(digest, "skip2-lora", 4, stale)
    store.activate(digest, store.save_version(stale, 1, digest, "skip2-lora", 4, 99.0), 99.0)
    with pytest.raises(FleetError, match="adapters version 2 hold 7 values, skip2-lora at rank 4"):
        load_device_model(tmp_path)
    figures = Figures.from_record(
        run_round(content(base, 2, False, data_paths=paths), node)[Part.FIGURES]
    )
    assert figures.accepted == 1
    assert load_device_model(tmp_path).round == 2


def test_versions_are_kept_and_rollback_makes_an_earlier_one_active(folders, tmp_path):
    root, base = folders
    node = {"device": "a", "state-dir": str(tmp_path)}
    paths = [str(root / "device"), ""]
    for number in range(1, 8):
        run_round(content(base, number, number == 1, data_paths=paths, accept="always"), node)
    store = DeviceStore(tmp_path)
    assert [v.round for v in store.versions()] == [3, 4, 5, 6, 7]  # the last five (README)
    result = fleet("rollback", "--state-dir", str(tmp_path), "--round", "4")
    assert result.exit_code == 0, result.output
    assert load_device_model(tmp_path).round == 4
    assert fleet("rollback", "--state-dir", str(tmp_path)).exit_code == 0
    assert load_device_model(tmp_path).round == 3
    result = fleet("rollback", "--state-dir", str(tmp_path), "--round", "1")
    assert result.exit_code == 2 and "no kept version of round 1" in result.output
    assert load_device_model(tmp_path).round == 3


def test_rollback_tells_versions_of_one_round_apart_and_keeps_to_the_active_base(tmp_path):
    """Two versions per round under base X, then one under base Y: "round 1" is the newest of
    round 1, "previous" the one just before the active one, and another base's never count."""
    store = DeviceStore(tmp_path)
    x, y = "x" * 64, "y" * 64
    made = {}
    for number, (base, round_) in enumerate([(x, 1), (x, 1), (x, 2), (x, 2), (y, 2)], 1):
        made[number] = store.save_version(
            np.full(3, number, np.float32), round_, base, "m", 4, number
        )
    assert len(made) <= KEEP_VERSIONS
    store.activate(x, made[4], 4.0)
    assert store.rollback(1) == made[2]  # the newest of round 1, not the oldest
    assert store.rollback() == made[1]  # the previous one, not the oldest of the base
    with pytest.raises(FleetError, match="no version older than the active one"):
        store.rollback()
    store.activate(y, made[5], 5.0)
    assert store.rollback(2) == made[5]  # round 2 under Y: X's versions of round 2 do not count
    with pytest.raises(FleetError, match=r"no kept version of round 1 \(kept: 2\)"):
        store.rollback(1)
    with pytest.raises(FleetError, match="no version older than the active one"):
        store.rollback()
    np.testing.assert_array_equal(store.version_theta(store.active().version), 5)


def test_new_files_are_picked_up_by_the_next_round(folders, tmp_path):
    _, base = folders
    device = tmp_path / "device"
    device.mkdir()
    np.savez(device / "1.npz", x=TASK.finetune.x[:100], y=NAMES[TASK.finetune.y[:100]])
    node = {"device": "a", "state-dir": str(tmp_path / "state")}
    first = run_round(content(base, data_paths=[str(device), ""]), node)
    np.savez(device / "2.npz", x=TASK.finetune.x[100:], y=NAMES[TASK.finetune.y[100:]])
    second = run_round(content(base, 2, False, data_paths=[str(device), ""]), node)
    assert (
        Figures.from_record(second[Part.FIGURES]).samples
        > Figures.from_record(first[Part.FIGURES]).samples
    )


def test_predict_from_a_file_and_from_stdin_says_which_model(folders, tmp_path):
    root, base = folders
    run_round(
        content(base, data_paths=[str(root / "device"), ""]),
        {"device": "a", "state-dir": str(tmp_path)},
    )
    new = tmp_path / "new.npz"
    np.savez(new, x=TASK.test.x[:5])  # no labels: samples to classify
    result = fleet("predict", str(new), "--state-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    classes = base_model.classes_of(base)
    assert header.split("\t") == ["label", "class", *classes]  # a column per class
    assert len(lines) == 5 and lines[0].split("\t")[1] in TASK.classes
    assert f"base {base_model.sha256(base)[:12]}, adapters of round 1" in result.stderr
    stdin = "".join(json.dumps(row.tolist()) + "\n" for row in TASK.test.x[:3])
    result = fleet("predict", "--state-dir", str(tmp_path), "--json", stdin=stdin)
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["round"] for a in answers] == [1, 1, 1]
    assert answers[0]["base_sha256"] == base_model.sha256(base)
    model = load_device_model(tmp_path)
    expected = model.predict(TASK.test.x[:3]).argmax(axis=1)
    assert [a["label"] for a in answers] == expected.tolist()
    assert list(answers[0]["probabilities"]) == list(base_model.classes_of(base))


def test_predict_refuses_the_wrong_width_naming_the_row(folders, tmp_path):
    root, base = folders
    run_round(
        content(base, data_paths=[str(root / "device"), ""]),
        {"device": "a", "state-dir": str(tmp_path)},
    )
    active = (tmp_path / "active.json").read_text()
    good = "".join(json.dumps(row.tolist()) + "\n" for row in TASK.test.x[:2])
    stdin = good + json.dumps([1.0, 2.0]) + "\n" + good
    result = fleet("predict", "--state-dir", str(tmp_path), stdin=stdin)
    assert result.exit_code == 2
    assert "stdin: line 3: a sample has 2 values; the model takes 64" in result.stderr
    assert len(result.stdout.splitlines()) == 1 + 2  # the answers before the bad line came
    write_csv(tmp_path / "narrow.csv", np.ones((3, 4)), ["normal"] * 3)
    result = fleet("predict", str(tmp_path / "narrow.csv"), "--state-dir", str(tmp_path))
    assert result.exit_code == 2 and "narrow.csv: line 2" in result.stderr
    assert (tmp_path / "active.json").read_text() == active


def test_data_check_reports_classes_and_hold_out(folders):
    root, _ = folders
    result = fleet("data", "check", str(root / "device"), "--base", str(root / "base.npz"))
    assert result.exit_code == 0, result.output
    assert f"{len(TASK.finetune):,} samples in 2 files, each 64" in result.stdout
    counts = np.bincount(TASK.finetune.y)
    assert f"{'normal':<20} {counts[TASK.classes.index('normal')]:>10,}" in result.stdout


def bad_folders(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each bad input, and what its message must say."""
    cases = {}

    def folder(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        return path

    d = folder("shapes")
    np.savez(d / "a.npz", x=np.ones((4, W)), y=np.zeros(4, int))
    np.savez(d / "b.npz", x=np.ones((4, 32)), y=np.zeros(4, int))
    cases["shapes"] = (d, "b.npz: samples of shape 32, but")
    d = folder("labels")
    write_csv(d / "a.csv", np.ones((3, W)), ["normal", "exploded", "normal"])
    cases["labels"] = (d, "a.csv: line 3: label 'exploded' is not a class of the base")
    d = folder("index")
    np.savez(d / "a.npz", x=np.ones((3, W)), y=np.array([0, 1, 7]))
    cases["index"] = (d, "a.npz: sample 2: label 7 is not a class of the base")
    cases["empty"] = (folder("empty"), "empty: no .npz or .csv files in this folder")
    d = folder("nolabel")
    write_csv(d / "a.csv", np.ones((3, W)), ["normal"] * 3, label_column="class")
    cases["nolabel"] = (d, "a.csv: no label column 'label' in the header")
    d = folder("nan")
    x = np.ones((5, W))
    x[3, 17] = np.nan
    np.savez(d / "a.npz", x=x, y=np.zeros(5, int))
    cases["nan"] = (d, "a.npz: sample 3: NaN or Inf")
    for name, value in (("inf", np.inf), ("minus-inf", -np.inf)):
        d = folder(name)
        x = np.ones((5, W))
        x[2, 5] = value
        write_csv(d / "a.csv", x, ["normal"] * 5)
        cases[name] = (d, "a.csv: line 4: NaN or Inf")
    d = folder("ragged")
    write_csv(d / "a.csv", np.ones((3, W)), ["normal"] * 3)
    with open(d / "a.csv", "a") as handle:
        handle.write("1,2,normal\n")
    cases["ragged"] = (d, "a.csv: line 5: 3 columns, the header has 65")
    d = folder("width")
    np.savez(d / "a.npz", x=np.ones((4, 100)), y=np.zeros(4, int))
    cases["width"] = (d, "a.npz: samples of 100 values; the base takes 64")
    return cases


def test_every_bad_input_is_named_with_exit_2(folders, tmp_path):
    root, _ = folders
    for name, (path, message) in bad_folders(tmp_path).items():
        result = fleet("data", "check", str(path), "--base", str(root / "base.npz"))
        assert result.exit_code == 2, (name, result.output)
        assert message in result.stderr.replace("\n", ""), (name, result.stderr)


def test_a_bad_folder_on_a_device_leaves_its_active_model(folders, tmp_path):
    root, base = folders
    node = {"device": "a", "state-dir": str(tmp_path / "state")}
    run_round(content(base, data_paths=[str(root / "device"), ""]), node)
    active = (tmp_path / "state" / "active.json").read_text()
    for path, message in bad_folders(tmp_path).values():
        if "base takes" in message:
            message = "the base takes 64 values per sample"
        with pytest.raises(FleetError) as caught:
            run_round(content(base, 2, False, data_paths=[str(path), ""]), node)
        assert message.split(": ", 1)[-1] in str(caught.value)
    assert (tmp_path / "state" / "active.json").read_text() == active


def test_npz_files_are_read_in_bounded_blocks(tmp_path):
    x = np.arange(10 * 2 * 3, dtype=np.float64).reshape(10, 2, 3)
    np.savez_compressed(tmp_path / "a.npz", x=x, y=np.arange(10) % 2)
    blocks = list(read_blocks(tmp_path, rows=4))
    assert [len(b.x) for b in blocks] == [4, 4, 2] and blocks[0].shape == (2, 3)
    assert np.array_equal(np.vstack([b.x for b in blocks]), x.reshape(10, 6))


def test_config_takes_own_data_and_refuses_what_does_not_fit():
    config = parse_config(
        {
            "task": {"source": "/srv/fan/source", "holdout": 0.2},
            "training": {"accept": "always"},
            "devices": [{"name": "pi-1", "data": {"path": "/var/lib/skip2fleet/data"}}],
        }
    )
    assert config.devices[0].data.path == "/var/lib/skip2fleet/data"
    bad = [
        ({"task": {"source": "/srv/x"}, "devices": [{"name": "a"}]}, "devices[0].data.path"),
        ({"devices": [{"name": "a", "data": {"path": "rel/x"}}]}, "devices[0].data.path"),
        ({"task": {"holdout": 1.0}}, "task.holdout"),
        ({"training": {"accept": "maybe"}}, "training.accept"),
    ]
    for raw, where in bad:
        with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
            parse_config(raw)


def test_the_agent_exports_the_active_model_and_whether_the_round_was_kept(folders, tmp_path):
    from skip2fleet.client.telemetry.agent import DeviceCollector
    from skip2fleet.client.telemetry.probes import ThermalZones
    from skip2fleet.shared import metric_names as names

    root, base = folders
    node = {"device": "a", "state-dir": str(tmp_path)}
    collector = DeviceCollector(None, ThermalZones(tmp_path / "none"), tmp_path / "none", tmp_path)

    def scrape() -> dict:  # the figures (this test's missing /proc only counts errors)
        return {
            (s.name, tuple(s.labels.values())): s.value
            for family in collector.collect()
            for s in family.samples
            if family.name != names.PROBE_ERRORS.name
        }

    run_round(content(base, data_paths=[str(root / "device"), ""]), node)
    samples = scrape()
    active = DeviceStore(tmp_path).active()
    assert samples[(names.ACTIVE_MODEL.name, ())] == pytest.approx(active.accuracy / 100)
    assert samples[(names.ACTIVE_MODEL_ROUND.name, ())] == 1  # values, not labels
    assert samples[(names.ACTIVE_MODEL_VERSION.name, ())] == 1
    digest = base_model.sha256(base)
    assert names.base_hex(samples[(names.ACTIVE_MODEL_BASE.name, ())]) == digest[:12]
    assert samples[(names.LAST_FINETUNE.format(figure="accepted"), ())] == 1
    run_round(content(base, 2, False, data_paths=[str(root / "device"), ""]), node)
    later = scrape()
    assert later.keys() == samples.keys()  # a new round makes no new series
    active = DeviceStore(tmp_path).active()
    assert later[(names.ACTIVE_MODEL_ROUND.name, ())] == active.version.round


def test_rollback_from_the_coordinator_names_an_unknown_device():
    """(The SSH path itself runs in tests/test_deploy.py, on namespace devices.)"""
    config = Path(__file__).resolve().parents[1] / "fleet.yaml"
    result = fleet("rollback", "--device", "nope", "--config", str(config))
    assert result.exit_code == 2 and "no device 'nope'" in result.stderr


def test_pretrain_on_a_source_folder_names_the_classes(folders, tmp_path):
    root, _ = folders
    out = tmp_path / "base.npz"
    result = fleet("pretrain", "--source", str(root / "source"), "--out", str(out), "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert "on the held-out part of --source" in result.stdout
    assert base_model.classes_of(base_model.load(out)) == tuple(SORTED)


def test_a_growing_folder_leaves_one_copy_of_its_data_and_cache(folders, tmp_path):
    _, base = folders
    device = tmp_path / "device"
    device.mkdir()
    node = {"device": "a", "state-dir": str(tmp_path / "state")}
    for number in (1, 2, 3):
        part = slice(100 * (number - 1), 100 * number)
        np.savez(device / f"{number}.npz", x=TASK.finetune.x[part], y=NAMES[TASK.finetune.y[part]])
        run_round(content(base, number, number == 1, data_paths=[str(device), ""]), node)
    assert len(list((tmp_path / "state" / "data").glob("own-*.npz"))) == 1
    assert len(list((tmp_path / "state" / "cache").iterdir())) == 1


def test_status_shows_the_active_model_from_the_agent(folders, tmp_path):
    """What `fleet status` prints per device, from the metric the agent serves."""
    from skip2fleet.client.telemetry.agent import DeviceCollector
    from skip2fleet.client.telemetry.probes import ThermalZones
    from skip2fleet.server.operations.status import active_model, metrics_by_key

    root, base = folders
    run_round(
        content(base, data_paths=[str(root / "device"), ""]),
        {"state-dir": str(tmp_path), "device": "a"},
    )
    collector = DeviceCollector(None, ThermalZones(tmp_path / "x"), tmp_path / "x", tmp_path)
    figures = metrics_by_key(collector.exposition().decode())
    accuracy = DeviceStore(tmp_path).active().accuracy
    assert (
        active_model(figures) == f"base {base_model.sha256(base)[:12]} + round 1 ({accuracy:.2f} %)"
    )
    assert active_model({}) == "-"


def test_a_device_keeps_only_its_newest_samples(folders):
    """Streamed: the newest `limit` training samples, the hold-out decided over all of them."""
    root, _ = folders
    everything = device_samples(root / "device", SORTED, "label", 0.25, 10**9)
    train, held = device_samples(root / "device", SORTED, "label", 0.25, 50)
    assert np.array_equal(train.x, everything[0].x[-50:])
    assert np.array_equal(train.y, everything[0].y[-50:])
    assert np.array_equal(held.x, everything[1].x[-17:])  # 50 x 0.25 / 0.75, rounded up
    assert len(everything[0]) + len(everything[1]) == len(TASK.finetune)
