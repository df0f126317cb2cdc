"""The base model: pretraining gradients, learning, and the .npz file with its identity."""

from __future__ import annotations

import numpy as np
import pytest

from skip2fleet.shared import model as base_model
from skip2fleet.shared.datasets import load_task
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.pretrain import TRAINED, PretrainConfig, loss_and_grads, pretrain


def test_pretrain_gradients_match_central_differences(tiny):
    model, x, y = tiny
    model = {k: v.astype(np.float64) for k, v in model.items()}
    x0, y = x[:9], y[:9]
    _, grads, _ = loss_and_grads(model, x0, y)
    eps = 1e-6
    for name in TRAINED:
        numeric = np.zeros_like(model[name])
        for i in np.ndindex(model[name].shape):
            keep = model[name][i]
            model[name][i] = keep + eps
            up = loss_and_grads(model, x0, y)[0]
            model[name][i] = keep - eps
            down = loss_and_grads(model, x0, y)[0]
            model[name][i] = keep
            numeric[i] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)


def test_pretraining_learns_the_source_domain():
    task = load_task("generated")
    model = pretrain(task.pretrain.x, task.pretrain.y, 3, PretrainConfig(epochs=10))
    logits = base_model.forward_frozen(model, task.pretrain.x)[-1]
    assert base_model.accuracy(logits, task.pretrain.y) > 95
    assert all(v.dtype == np.float32 for v in model.values())


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
