"""The base model: pretraining gradients, learning, and the .npz file with its identity."""

from __future__ import annotations

import numpy as np
import pytest

from skip2fleet.shared import model as base_model
from skip2fleet.shared.datasets import load_task
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.pretrain import PretrainConfig, pretrain, pretraining_tuner
from tests.conftest import TINY_SPECS, tiny_model
from tests.test_engine import check_gradient


@pytest.mark.parametrize("kind", TINY_SPECS)
def test_pretrain_gradients_match_central_differences(kind):
    """Batch statistics included: every weight, bias and batch-norm scale and shift."""
    model, x, y = tiny_model(kind)
    tuner = pretraining_tuner(model, 9)
    tuner.attach(x, y)
    check_gradient(tuner, np.arange(9))


@pytest.mark.parametrize("kind", ["resnet2d", "zoo2d"])
def test_pretraining_updates_the_running_statistics_inside_residual_paths(kind):
    _, x, y = tiny_model(kind)
    spec = TINY_SPECS[kind]
    model = pretrain(x, y, 3, PretrainConfig(epochs=1, batch_size=8), spec=spec)
    norms = [p.k for p in spec.placed() if p.layer.op == "batchnorm"]
    assert any(p.parent >= 0 and p.layer.op == "batchnorm" for p in spec.placed())
    for k in norms:
        assert np.abs(model[f"mean{k}"]).min() > 0 and np.abs(model[f"var{k}"] - 1).min() > 0, k


def test_pretraining_learns_the_source_domain():
    task = load_task("generated")
    model = pretrain(task.pretrain.x, task.pretrain.y, 3, PretrainConfig(epochs=10))
    logits = base_model.logits(model, task.pretrain.x)
    assert base_model.accuracy(logits, task.pretrain.y) > 95
    assert all(v.dtype == np.float32 for k, v in model.items() if k != "spec")


def test_save_load_roundtrip_keeps_the_hash(tmp_path, tiny):
    model, _, _ = tiny
    digest = base_model.save(model, tmp_path / "base.npz")
    loaded = base_model.load(tmp_path / "base.npz")
    assert base_model.sha256(loaded) == digest
    loaded["W1"][0, 0] += 1e-3
    assert base_model.sha256(loaded) != digest
    assert [p.name for p in tmp_path.iterdir()] == ["base.npz"]  # no temporary left behind


def test_bad_model_files_are_named(tmp_path, tiny):
    model, _, _ = tiny
    with pytest.raises(FleetError, match="no such base model file"):
        base_model.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(FleetError, match=r"junk\.npz: not a readable \.npz model"):
        base_model.load(tmp_path / "junk.npz")
    broken = dict(model)
    broken["b2"] = np.array([0.0, np.nan, 0.0], np.float32)
    base_model.save(broken, tmp_path / "nan.npz")
    with pytest.raises(FleetError, match="array b2 holds NaN"):
        base_model.load(tmp_path / "nan.npz")
    del broken["W0"]
    base_model.save(broken, tmp_path / "partial.npz")
    with pytest.raises(FleetError, match="missing arrays W0"):
        base_model.load(tmp_path / "partial.npz")
