"""One device's round, without the transport: base checks, the on-disk cache, continuing."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict

from skip2fleet.client.clientapp import run_round
from skip2fleet.shared import model as base_model
from skip2fleet.shared.adapters import packed_size, unpack
from skip2fleet.shared.datasets import TaskOptions, load_task
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.pretrain import PretrainConfig, pretrain
from skip2fleet.shared.protocol import ADAPTERS, BASE, FIGURES, PLAN, Figures, RoundPlan
from skip2fleet.shared.records import model_record, record_vector
from skip2fleet.shared.spec import cnn


@pytest.fixture(scope="module")
def base():
    task = load_task("generated")
    return pretrain(task.pretrain.x, task.pretrain.y, 3, PretrainConfig(epochs=10))


def plan(base, round_=1, **changes) -> RoundPlan:
    values = dict(
        round=round_,
        method="skip2-lora",
        cache="f32",
        epochs=20,
        lr=0.01,
        batch_size=20,
        seed=0,
        base_sha256=base_model.sha256(base),
        dataset="generated",
        data_dir="",
        source_room="silentA",
        state_root="",
        devices=["a", "b"],
        partitions=["0", "1"],
        ranks=[4, 2],
        probes=["cpu-model", "none"],
        idle_watts=[1.0, 1.0],
        full_watts=[3.0, 3.0],
    )
    return RoundPlan(**{**values, **changes})


def content(base, round_=1, with_base=True, **changes) -> RecordDict:
    records = RecordDict({PLAN: plan(base, round_, **changes).record()})
    if with_base:
        records[BASE] = model_record(base)
    return records


def test_first_round_stores_base_and_cache_then_reuses_them(tmp_path, base):
    node = {"device": "b", "state-dir": str(tmp_path)}
    first = run_round(content(base), node)
    figures = Figures.from_record(first[FIGURES])
    assert figures.cache_built == 1 and figures.rank == 2
    assert figures.acc_after > figures.acc_before
    vector = record_vector(first[ADAPTERS])
    assert vector.dtype == np.float32
    assert vector.shape == (packed_size(get_method("skip2-lora"), base_model.spec_of(base), 2),)
    assert figures.uplink_bytes > vector.nbytes
    assert len(list((tmp_path / "cache").iterdir())) == 1

    second = run_round(content(base, round_=2, with_base=False), node)  # no base sent again
    again = Figures.from_record(second[FIGURES])
    assert again.cache_built == 0
    before = unpack(vector, get_method("skip2-lora"), base_model.spec_of(base), 2)
    after = unpack(
        record_vector(second[ADAPTERS]), get_method("skip2-lora"), base_model.spec_of(base), 2
    )
    assert not np.array_equal(before, after)  # it continued training its own adapters
    assert (tmp_path / "last-finetune.json").is_file()


def test_a_quantized_cache_is_kept_per_codec_and_reused(tmp_path, base):
    node = {"device": "a", "state-dir": str(tmp_path)}
    sizes = {}
    for codec in ("f32", "int4"):
        figures = Figures.from_record(run_round(content(base, cache=codec), node)[FIGURES])
        assert figures.cache_built == 1
        sizes[codec] = figures.cache_bytes
    assert sizes["int4"] <= 0.15 * sizes["f32"]
    names = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert [name.rsplit("-", 1)[1] for name in names] == ["f32.npz", "int4.npz"]
    again = Figures.from_record(run_round(content(base, 2, False, cache="int4"), node)[FIGURES])
    assert again.cache_built == 0 and again.cache_bytes == sizes["int4"]


def test_a_base_whose_hash_does_not_match_is_refused(tmp_path, base):
    forged = {k: v.copy() for k, v in base.items()}
    forged["b2"] += 1.0
    records = content(base)
    records[BASE] = model_record(forged)
    with pytest.raises(FleetError, match="does not match the announced"):
        run_round(records, {"device": "a", "state-dir": str(tmp_path)})
    assert not (tmp_path / "base").exists()


def test_a_device_without_the_base_says_so(tmp_path, base):
    with pytest.raises(FleetError, match="no base model"):
        run_round(content(base, with_base=False), {"device": "a", "state-dir": str(tmp_path)})


def test_a_device_outside_the_fleet_says_so(tmp_path, base):
    with pytest.raises(FleetError, match="'c' is not in the fleet"):
        run_round(content(base), {"device": "c", "state-dir": str(tmp_path)})


@pytest.mark.parametrize("method", ["skip2-lora", "lora-all"])
def test_a_cnn_base_travels_with_its_spec_and_the_device_reads_windows(tmp_path, method):
    """The device learns the model, and so the data form, from the base alone."""
    task = load_task("generated", TaskOptions(form="windows"))
    spec = cnn(1, 64, 3, widths=(4, 8, 8))
    cnn_base = pretrain(task.pretrain.x, task.pretrain.y, 3, PretrainConfig(epochs=2), spec=spec)
    reply = run_round(content(cnn_base, method=method), {"device": "b", "state-dir": str(tmp_path)})
    figures = Figures.from_record(reply[FIGURES])
    vector = record_vector(reply[ADAPTERS])
    assert vector.shape == (packed_size(get_method(method), base_model.spec_of(cnn_base), 2),)
    assert np.abs(vector).max() > 0 and 0 <= figures.acc_after <= 100
