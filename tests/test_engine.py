"""The engine's numerics: gradients against central finite differences, the exact cache, merging."""

from __future__ import annotations

import numpy as np
import pytest

from skip2fleet.shared.engine import FineTuner, count_matmul_flops
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.methods import METHODS, get_method
from skip2fleet.shared.model import forward_frozen

ALL = list(METHODS)


def _randomise(tuner: FineTuner, rng: np.random.Generator) -> np.ndarray:
    """Give every trainable a random value (B is zero at init, which would hide A's gradient);
    returns the flat mask of real parameters (the skip A's off-diagonal blocks are not)."""
    tuner.theta[...] += rng.normal(scale=0.5, size=tuner.theta.shape)
    real = np.ones(tuner.theta.shape, bool)
    if tuner.method.skip:
        tuner.params["A_skip"] *= tuner.skip_mask != 0
        offset = 0
        for name, array in tuner.params.items():
            if name == "A_skip":
                real[offset : offset + array.size] = (tuner.skip_mask != 0).ravel()
            offset += array.size
    tuner.refresh()
    return real


def assert_trained(initial: dict[str, np.ndarray], trained: dict[str, np.ndarray]) -> None:
    """Every trainable array moved, B (zero at init, so equal on an engine that never steps)
    first: an exactness test that compares two untrained engines would pass on `update = pass`."""
    for name in sorted(initial, key=lambda n: not n.startswith("B")):
        assert np.abs(trained[name] - initial[name]).max() > 0, f"{name} never moved"


@pytest.mark.parametrize("name", ALL)
def test_gradient_matches_central_differences(tiny, name):
    model, x, y = tiny
    tuner = FineTuner(model, get_method(name), rank=2, alpha=3.0, batch_size=6, dtype=np.float64)
    tuner.attach(x, y)
    real = _randomise(tuner, np.random.default_rng(1))
    idx = np.array([3, 1, 4, 15, 9, 26])
    tuner.forward(idx)
    tuner.backward()
    analytic = tuner.grad.copy()
    numeric = np.zeros_like(analytic)
    eps = 1e-6
    for i in np.flatnonzero(real):
        keep = tuner.theta[i]
        tuner.theta[i] = keep + eps
        tuner.refresh()
        up = tuner.loss(idx)
        tuner.theta[i] = keep - eps
        tuner.refresh()
        down = tuner.loss(idx)
        tuner.theta[i] = keep
        numeric[i] = (up - down) / (2 * eps)
    tuner.refresh()
    assert np.abs(analytic).max() > 1e-3  # the check is not vacuous
    np.testing.assert_allclose(analytic[real], numeric[real], rtol=1e-5, atol=1e-8)
    assert np.all(analytic[~real] == 0)


def test_every_method_starts_at_the_base_model(tiny):
    model, x, y = tiny
    base_logits = forward_frozen(model, x.astype(np.float32))[-1]
    for name in ALL:
        tuner = FineTuner(model, get_method(name), batch_size=40)
        tuner.attach(x, y)
        tuner.forward(np.arange(40))
        np.testing.assert_allclose(tuner.z, base_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_merged_predictor_equals_training_forward(tiny, name):
    model, x, y = tiny
    tuner = FineTuner(model, get_method(name), rank=2, batch_size=40, dtype=np.float64)
    tuner.attach(x, y)
    _randomise(tuner, np.random.default_rng(2))
    tuner.forward(np.arange(40))
    np.testing.assert_allclose(tuner.merged()(x), tuner.z, rtol=1e-9, atol=1e-9)


def test_skip2_cache_gives_the_same_steps_as_skip_lora(tiny):
    """Bit for bit: the cache holds exactly what the forward pass would compute."""
    model, x, y = tiny
    runs = {}
    for name in ("skip-lora", "skip2-lora"):
        tuner = FineTuner(model, get_method(name), batch_size=8, seed=3)
        tuner.attach(x, y)
        initial = tuner.adapters()
        order = np.random.default_rng(0)
        for _ in range(50):
            tuner.forward(order.permutation(40)[:8])
            tuner.backward()
            tuner.update(0.1)
        assert_trained(initial, tuner.adapters())
        runs[name] = tuner.theta.copy()
    np.testing.assert_array_equal(runs["skip-lora"], runs["skip2-lora"])


def test_backward_reaches_only_as_far_as_needed():
    assert get_method("skip2-lora").reaches == 3
    assert get_method("skip-lora").reaches == 3
    assert get_method("ft-last").reaches == 2
    assert get_method("lora-last").reaches == 2
    assert get_method("lora-all").reaches == 0


def test_flop_count_follows_the_method(tiny):
    model, x, y = tiny
    counts = {}
    for name in ALL:
        tuner = FineTuner(model, get_method(name), rank=2, batch_size=4)
        tuner.attach(x, y)
        with count_matmul_flops() as counter:
            tuner.forward(np.arange(4))
            tuner.backward()
        counts[name] = counter[0]
    # skip2 forward: [x0|x1|x2] (4x17) @ A (17x6), H @ B (6x3);
    # backward: H.T @ dz (6x4x3), dz @ B.T (4x3x6), [x0|x1|x2].T @ dH (17x4x6)
    assert counts["skip2-lora"] == 2 * 4 * (17 * 6 + 6 * 3) + 2 * 4 * (6 * 3 + 3 * 6 + 17 * 6)
    assert counts["skip-lora"] == counts["skip2-lora"] + 2 * 4 * (7 * 5 + 5 * 5 + 5 * 3)
    assert counts["ft-last"] == 2 * 4 * (7 * 5 + 5 * 5 + 5 * 3) + 2 * 4 * 5 * 3


def test_unknown_method_names_the_choices():
    with pytest.raises(FleetError, match=r"unknown method 'lora-first'.*skip2-lora"):
        get_method("lora-first")


def test_skip2_matches_skip_lora_after_a_full_har_fine_tune(data_dir):
    """The issue's bound: max |adapter difference| <= 1e-5 after the paper's 600 epochs."""
    from skip2fleet.shared.datasets import TaskOptions, load_task
    from skip2fleet.shared.pretrain import PretrainConfig, pretrain
    from skip2fleet.shared.train import FineTuneConfig, finetune

    task = load_task("har", TaskOptions(data_dir))
    base = pretrain(task.pretrain.x, task.pretrain.y, 6, PretrainConfig(epochs=2))
    config = FineTuneConfig(epochs=600, seed=5)
    thetas = []
    for name in ("skip-lora", "skip2-lora"):
        tuner = finetune(base, get_method(name), task.finetune.x, task.finetune.y, config).tuner
        initial = FineTuner(base, get_method(name), batch_size=config.batch_size, seed=config.seed)
        assert_trained(initial.adapters(), tuner.adapters())
        thetas.append(tuner.theta)
    skip, skip2 = thetas
    assert np.abs(skip - skip2).max() <= 1e-5


@pytest.mark.parametrize("name", ALL)
def test_packing_keeps_exactly_the_real_parameters(tiny, name):
    from skip2fleet.shared.adapters import pack, packed_size, unpack

    model, _, _ = tiny
    tuner = FineTuner(model, get_method(name), rank=2, batch_size=4)
    real = _randomise(tuner, np.random.default_rng(3))
    packed = pack(tuner.theta, tuner.method, tuner.dims, 2)
    assert packed.size == packed_size(tuner.method, tuner.dims, 2) == real.sum()
    np.testing.assert_array_equal(unpack(packed, tuner.method, tuner.dims, 2), tuner.theta)
    with pytest.raises(ValueError, match="packed values"):
        unpack(packed[:-1], tuner.method, tuner.dims, 2)
