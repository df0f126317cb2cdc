"""The engine's numerics on every (model, method) pair: gradients against central finite
differences, the forward pass against the float64 oracle, merging, and the exact Skip2 cache."""

from __future__ import annotations

import numpy as np
import pytest

from skip2fleet.shared.engine import FineTuner
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.flops import count_flops
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import METHODS, get_method
from skip2fleet.shared.model import spec_of
from skip2fleet.shared.peft.lora import kaiming_uniform
from skip2fleet.shared.records import adapters_record, record_adapters
from tests.conftest import TINY_SPECS, tiny_model
from tests.reference import reference_logits

ALL = list(METHODS)
PAIRS = [(kind, name) for kind in TINY_SPECS for name in ALL]


def _randomise(tuner: FineTuner, rng: np.random.Generator) -> None:
    """Give every trainable a random value (B is zero at init, which would hide A's gradient)."""
    tuner.theta[...] += rng.normal(scale=0.5, size=tuner.theta.shape)


def assert_trained(initial: dict[str, np.ndarray], trained: dict[str, np.ndarray]) -> None:
    """Every trainable array moved, B (zero at init, so equal on an engine that never steps)
    first: an exactness test that compares two untrained engines would pass on `update = pass`."""
    for name in sorted(initial, key=lambda n: not n.startswith("B")):
        assert np.abs(trained[name] - initial[name]).max() > 0, f"{name} never moved"


def _hold_dora_norms(tuner: FineTuner) -> None:
    """DoRA's gradient treats ||W + sBA|| as a constant (as the paper and PEFT do): hold it at its
    current value so that finite differences see the same function."""
    for k, adapter in tuner.layer_adapters.items():
        if hasattr(adapter, "held_norm"):
            adapter.weight(tuner.model[f"W{k}"])
            adapter.held_norm = np.linalg.norm(adapter.V, axis=0)


def check_gradient(tuner: FineTuner, idx: np.ndarray) -> None:
    tuner.forward(idx)
    tuner.backward()
    analytic = tuner.grad.copy()
    numeric = np.zeros_like(analytic)
    eps = 1e-6
    for i in range(tuner.theta.size):
        keep = tuner.theta[i]
        tuner.theta[i] = keep + eps
        up = tuner.loss(idx)
        tuner.theta[i] = keep - eps
        down = tuner.loss(idx)
        tuner.theta[i] = keep
        numeric[i] = (up - down) / (2 * eps)
    assert np.abs(analytic).max() > 1e-3  # the check is not vacuous
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("kind", "name"), PAIRS)
def test_gradient_matches_central_differences(kind, name):
    model, x, y = tiny_model(kind)
    tuner = FineTuner(model, get_method(name), rank=2, batch_size=6, dtype=np.float64)
    tuner.attach(x, y)
    _randomise(tuner, np.random.default_rng(1))
    _hold_dora_norms(tuner)
    check_gradient(tuner, np.array([3, 1, 4, 15, 9, 26]))


@pytest.mark.parametrize("kind", TINY_SPECS)
def test_every_method_starts_at_the_base_model(kind):
    model, x, y = tiny_model(kind)
    base_logits = reference_logits(spec_of(model), model, x)
    for name in ALL:
        tuner = FineTuner(model, get_method(name), batch_size=40)
        tuner.attach(x, y)
        tuner.forward(np.arange(40))
        np.testing.assert_allclose(tuner.z, base_logits, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize(("kind", "name"), PAIRS)
def test_training_forward_and_merged_predictor_match_the_oracle(kind, name):
    model, x, y = tiny_model(kind)
    tuner = FineTuner(model, get_method(name), rank=2, batch_size=40, dtype=np.float64)
    tuner.attach(x, y)
    _randomise(tuner, np.random.default_rng(2))
    tuner.forward(np.arange(40))
    predictor = tuner.merged()
    arrays, skips = tuner.layout.merged(model, tuner.theta)
    oracle = reference_logits(tuner.spec, arrays, x, skips)
    np.testing.assert_allclose(tuner.z, oracle, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(predictor(x), oracle, rtol=1e-9, atol=1e-9)
    assert np.abs(oracle - reference_logits(tuner.spec, model, x)).max() > 1e-3  # adapters count


@pytest.mark.parametrize("kind", TINY_SPECS)
def test_skip2_cache_gives_the_same_steps_as_skip_lora(kind):
    """The cache holds what the forward pass computes: both end with the same adapters."""
    model, x, y = tiny_model(kind)
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
    np.testing.assert_array_equal(runs["skip-lora"], runs["skip2-lora"])  # exactly: same sums


@pytest.mark.parametrize("kind", TINY_SPECS)
def test_backward_reaches_only_as_far_as_needed(kind):
    model, _, _ = tiny_model(kind)
    lowest = {
        name: FineTuner(model, get_method(name)).network.lowest
        for name in ("skip2-lora", "skip-lora", "ft-last", "lora-last", "lora-all", "ft-all")
    }
    ops = len(FineTuner(model, get_method("ft-all")).network.ops)
    assert lowest["skip2-lora"] == lowest["skip-lora"] == ops
    assert lowest["ft-last"] == lowest["lora-last"] == ops - 1
    assert lowest["ft-all"] == 0
    first_adaptable = spec_of(model).weighted()[0].adaptable  # not a grouped conv (zoo2d's)
    assert (lowest["lora-all"] == 0) == first_adaptable


def test_flop_count_follows_the_method(tiny):
    model, x, y = tiny
    counts = {}
    for name in ALL:
        tuner = FineTuner(model, get_method(name), rank=2, batch_size=4)
        tuner.attach(x, y)
        with count_flops() as counter:
            tuner.forward(np.arange(4))
            tuner.backward()
        counts[name] = sum(counter.values())
    # skip2 forward: x_t (4 x n_t) @ A_t (n_t x 2) for taps of 7 + 5 + 5 = 17, H @ B (6x3);
    # backward: H.T @ dz (6x4x3), dz @ B.T (4x3x6), x_t.T @ dH_t (n_t x 4 x 2)
    assert counts["skip2-lora"] == 2 * 4 * (17 * 2 + 6 * 3) + 2 * 4 * (6 * 3 + 3 * 6 + 17 * 2)
    assert counts["skip-lora"] == counts["skip2-lora"] + 2 * 4 * (7 * 5 + 5 * 5 + 5 * 3)
    assert counts["ft-last"] == 2 * 4 * (7 * 5 + 5 * 5 + 5 * 3) + 2 * 4 * 5 * 3


def test_no_adapter_beside_a_depthwise_layer():
    spec = TINY_SPECS["dscnn"]
    adapted = get_method("lora-all").adapted(spec)
    assert {p.layer.op for p in adapted} == {"conv1d", "linear"}
    assert len(adapted) == len(spec.weighted()) - 2  # the two depthwise layers


@pytest.mark.parametrize(("kind", "weight"), [("cnn", "W1"), ("mlp", "W1")])  # 15 x 4; 5 x 5
def test_galore_steps_are_low_rank(kind, weight):
    model, x, y = tiny_model(kind)
    tuner = FineTuner(model, get_method("galore"), rank=1, batch_size=8)
    tuner.attach(x, y)
    before = tuner.params[weight].copy()
    tuner.forward(np.arange(8))
    tuner.backward()
    gradient = tuner.grads[weight].copy()
    with count_flops() as counter:
        tuner.update(0.1)
    step = tuner.params[weight] - before
    singular = np.linalg.svd(step, compute_uv=False)
    assert singular[0] > 1e-4 and singular[1] < 1e-6 * singular[0]
    # the step is -lr P P^T G, P the gradient's top left singular vector, when G has no more
    # rows than columns (a square one too), else G Q Q^T with the top right one
    u, _, vt = np.linalg.svd(gradient.astype(np.float64), full_matrices=False)
    if gradient.shape[0] <= gradient.shape[1]:
        projected = u[:, :1] @ (u[:, :1].T @ gradient)
    else:
        projected = (gradient @ vt[:1].T) @ vt[:1]
    np.testing.assert_allclose(step, -0.1 * projected, rtol=1e-4, atol=1e-7)
    # one SVD per projected matrix every 200 steps (GaLore's default), counted amortised
    assert tuner.galore_interval == 200
    shapes = [g.shape for name, g in tuner.grads.items() if name[0] == "W" and min(g.shape) > 1]
    assert counter["svd"] == sum(6 * max(s) * min(s) ** 2 + 11 * min(s) ** 3 for s in shapes) // 200


def test_galore_refreshes_its_projectors_every_interval_steps_and_only_then():
    """With rank 1 every step lies along the projector's one direction: the same for steps 0-3,
    a new one from step 4 (the interval), which step 5 keeps."""
    model, x, y = tiny_model("cnn")
    tuner = FineTuner(model, get_method("galore"), rank=1, batch_size=8, galore_interval=4)
    tuner.attach(x, y)
    directions = []
    for step in range(6):
        before = tuner.params["W1"].copy()
        tuner.forward(np.arange(8) + 8 * (step % 5))  # a new batch each step: new gradients
        tuner.backward()
        tuner.update(0.1)
        moved = (tuner.params["W1"] - before).astype(np.float64)
        u, _, vt = np.linalg.svd(moved, full_matrices=False)
        directions.append(u[:, 0] if moved.shape[0] <= moved.shape[1] else vt[0])
    same = [abs(float(directions[i] @ directions[j])) > 0.9999 for i, j in (
        (0, 1), (0, 2), (0, 3), (0, 4), (4, 5))]  # fmt: skip
    assert same == [True, True, True, False, True]


def test_a_plain_sgd_step_is_theta_minus_lr_times_the_gradient_at_two_flops_a_value(tiny):
    model, x, y = tiny
    tuner = FineTuner(model, get_method("lora-all"), rank=2, batch_size=4)
    tuner.attach(x, y)
    tuner.forward(np.arange(4))
    tuner.backward()
    theta, gradient = tuner.theta.copy(), tuner.grad.copy()
    with count_flops() as counter:
        tuner.update(0.1)
    np.testing.assert_allclose(tuner.theta, theta - np.float32(0.1) * gradient, rtol=1e-6)
    assert sum(counter.values()) == 2 * theta.size  # a multiply and an add per value


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


@pytest.mark.parametrize(("kind", "name"), PAIRS)
def test_adapters_travel_as_theta_and_the_wire_check_holds_both_ends(kind, name):
    model, _, _ = tiny_model(kind)
    tuner = FineTuner(model, get_method(name), rank=2, batch_size=4)
    _randomise(tuner, np.random.default_rng(3))
    size = layout(tuner.method, tuner.spec, 2).size
    assert size == tuner.theta.size
    record = adapters_record(tuner.theta, size)
    np.testing.assert_array_equal(record_adapters(record, size), tuner.theta)
    with pytest.raises(ValueError, match=rf"expected float32 \({size - 1},\)"):
        adapters_record(tuner.theta, size - 1)  # the sender's side
    with pytest.raises(ValueError, match=rf"expected float32 \({size + 1},\)"):
        record_adapters(record, size + 1)  # the receiver's side


@pytest.mark.parametrize(("kind", "name"), PAIRS)
def test_merging_for_prediction_builds_no_fine_tuner(kind, name, monkeypatch):
    """The layout merges `theta` into the base on its own: the same predictor as the trainer's,
    with no trainer (its buffers and optimizer state) built."""
    model, x, _ = tiny_model(kind)
    tuner = FineTuner(model, get_method(name), rank=2, batch_size=4)
    _randomise(tuner, np.random.default_rng(4))
    expected = tuner.merged()(x)

    def no_trainer(*args, **kwargs):
        raise AssertionError("merging built a FineTuner")

    monkeypatch.setattr(FineTuner, "__init__", no_trainer)
    np.testing.assert_array_equal(
        layout(tuner.method, tuner.spec, 2).predictor(model, tuner.theta)(x), expected
    )


def test_lora_a_starts_as_pefts_kaiming_uniform_of_its_fan_in():
    """U(-1/sqrt(fan_in), +1/sqrt(fan_in)), both signs, nearly to the bound (400 x 4 draws)."""
    a = kaiming_uniform(np.random.default_rng(0), (400, 4))
    bound = 1 / np.sqrt(400)
    assert np.abs(a).max() <= bound
    assert a.max() > 0.95 * bound and a.min() < -0.95 * bound


def test_lora_computes_no_gradient_of_the_frozen_weight(tiny):
    """Its backward's weight-gradient products, per layer (in, out) at batch 4 and rank 2, each
    2 m k n: gB = u.T dout (2 2 4 out), du = dout B.T (2 4 out 2), gA = cols.T du (2 in 4 2);
    never the frozen weight's cols.T dout (2 in 4 out)."""
    model, x, y = tiny
    tuner = FineTuner(model, get_method("lora-all"), rank=2, batch_size=4)
    tuner.attach(x, y)
    tuner.forward(np.arange(4))
    with count_flops() as counter:
        tuner.backward()
    layers = ((7, 5), (5, 5), (5, 3))
    assert counter["weight_grad"] == sum(
        16 * out + 16 * out + 16 * fan_in for fan_in, out in layers
    )
