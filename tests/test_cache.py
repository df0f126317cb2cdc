"""The quantized Skip2 cache: the codecs' error bound, their size, a batch's gather that never
expands the cache, and a fine-tune on an int8 cache that matches the exact one."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest

from skip2fleet.shared.cache import CODECS, GROUP, build_cache, groups_of
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.model import init_model, spec_of
from skip2fleet.shared.spec import cnn, mlp
from skip2fleet.shared.train import FineTuneConfig, finetune
from tests.conftest import TINY_SPECS, tiny_model

# The README's models at their real sizes: HAR's MLP and CNN, Fan's MLP.
REAL_SPECS = {"mlp-har": mlp(220, 6), "mlp-fan": mlp(256, 3), "cnn-har": cnn(9, 128, 6)}


def real_model(name: str, samples: int = 64):
    spec = REAL_SPECS[name]
    rng = np.random.default_rng(3)
    model = init_model(spec, rng)
    model["in_mean"] = np.zeros(spec.width, np.float32)
    model["in_std"] = np.ones(spec.width, np.float32)
    # inputs on several scales, so groups differ in range
    x = rng.normal(size=(samples, spec.width)) * rng.choice([0.1, 1, 20], size=(samples, 1))
    return model, x


def test_groups_never_cross_a_tap_and_hold_at_most_group_values():
    taps = [220, 96, 5, 1152, 129]
    group = groups_of(taps)
    sizes = np.bincount(group)
    assert sizes.max() <= GROUP <= 128  # runs of at most 128 values (docs/design.md)
    assert len(sizes) == 2 + 1 + 1 + 9 + 2  # ceil(tap / 128) each: a tap of 129 takes two
    assert np.all(np.diff(group) >= 0)
    starts = np.cumsum([0, *taps])[:-1]
    for start in starts[1:]:
        assert group[start] != group[start - 1]  # a new tap opens a new group


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("name", list(REAL_SPECS))
def test_round_trip_error_is_within_half_a_step(name, codec):
    model, x = real_model(name)
    exact = build_cache(model, x).decoded()
    cache = build_cache(model, x, codec)
    decoded = cache.decoded()
    width = cache.width
    values = exact[:, :width]
    group = groups_of(spec_of(model).taps())
    # half a step, (high - low) / levels / 2 per row and group, computed here from the values;
    # float16 offsets (rounded down) and scales (rounded up) widen it by a few 2^-11
    low = np.stack([values[:, group == g].min(axis=1) for g in range(group.max() + 1)], 1)
    high = np.stack([values[:, group == g].max(axis=1) for g in range(group.max() + 1)], 1)
    levels = {"int8": 255, "int4": 15}[codec]
    half_step = (high - low) / levels / 2 * (1 + 2**-9) + np.abs(low) * 2**-10 / levels
    bound = half_step[:, group] + 1e-6 * np.abs(values)
    error = np.abs(decoded[:, :width] - values)
    assert np.all(error <= bound)
    # and within the half step the cache reports (its float16 scale over 2), to float32 rounding
    assert np.all(cache.max_error() <= bound)
    assert np.all(error <= cache.max_error() * (1 + 1e-6) + 1e-6 * np.abs(values))
    assert np.abs(decoded[:, :width] - values).max() > 0  # not an exact copy in disguise
    # the base logits are float16: relative error 2^-11
    logits = exact[:, width:]
    assert np.allclose(decoded[:, width:], logits, rtol=2**-10, atol=1e-6)


@pytest.mark.parametrize("name", list(REAL_SPECS))
def test_quantized_caches_are_a_quarter_and_an_eighth_of_f32_scales_included(name):
    model, x = real_model(name)
    sizes = {codec: build_cache(model, x, codec).nbytes for codec in CODECS}
    assert sizes["f32"] == len(x) * (sum(spec_of(model).taps()) + spec_of(model).n_classes) * 4
    assert sizes["int8"] <= 0.27 * sizes["f32"]
    assert sizes["int4"] <= 0.15 * sizes["f32"]


def test_a_constant_group_decodes_exactly_without_dividing_by_zero():
    model, x = real_model("mlp-fan", 8)
    x[:, :128] = 0.0  # the first group of the input tap is all zeros (standardised: mean 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a zero scale would divide 0 by 0
        decoded = build_cache(model, x, "int4").decoded()
    assert np.all(decoded[:, :128] == 0.0)


def test_a_group_whose_steps_float16_holds_exactly_decodes_exactly():
    """Offset 0 and scale 1 are float16 values: rounding them outward would be an error here."""
    model, x = real_model("mlp-fan", 8)
    x[:, :128] = np.r_[0, 255, np.arange(1, 127) * 2]  # integers from 0 to 255 (the input tap)
    decoded = build_cache(model, x, "int8").decoded()
    assert np.array_equal(decoded[:, :128], x[:, :128])


def test_a_group_far_from_zero_keeps_the_half_step_bound():
    """Offsets are rounded down to float16, whose steps are coarse far from zero (0.5 at 1000):
    rounded up, the group's smallest value would be off by up to a float16 step."""
    model, x = real_model("mlp-fan", 8)
    x[:, :128] = 1000.3 + np.random.default_rng(5).uniform(0, 1, size=(len(x), 128))
    values = build_cache(model, x).decoded()[:, :128]
    decoded = build_cache(model, x, "int8").decoded()[:, :128]
    low, high = values.min(axis=1, keepdims=True), values.max(axis=1, keepdims=True)
    half_step = (high - low) / 255 / 2 * (1 + 2**-9) + np.abs(low) * 2**-10 / 255
    assert np.all(np.abs(decoded - values) <= half_step)


def test_the_largest_activation_a_quantized_cache_takes_is_half_of_float16s_range():
    model, x = real_model("mlp-fan", 8)
    limit = float(np.finfo(np.float16).max) / 2
    x[0, 0] = limit  # the input tap: exactly at the limit, taken
    build_cache(model, x, "int8")
    x[0, 0] = 1.2 * limit
    with pytest.raises(FleetError, match="too large for a quantized cache"):
        build_cache(model, x, "int8")


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_a_batch_gather_never_expands_the_cache(codec):
    model, x = real_model("cnn-har", 256)
    cache = build_cache(model, x, codec)
    out = np.zeros((20, cache.width + cache.n_classes), np.float32)
    idx = np.arange(20)
    cache.gather(idx, out)
    tracemalloc.start()
    cache.gather(idx, out)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    whole = len(x) * out.shape[1] * 4
    assert peak <= 3 * out.nbytes < whole / 4  # a few batch-sized temporaries, never the cache


def test_unknown_codec_and_overflowing_activations_are_refused():
    model, x = real_model("mlp-fan", 8)
    with pytest.raises(FleetError, match="unknown cache codec 'int2'"):
        build_cache(model, x, "int2")
    with pytest.raises(FleetError, match="too large for a quantized cache"):
        build_cache(model, x * 1e9, "int8")


def test_an_int8_fine_tune_matches_the_exact_cache():
    """int8 moves each cached value by at most half a step, 1/510 of its group's range, so the
    adapters see inputs within about 0.2 % of their spread: after training, the merged predictors'
    logits may differ by a few tenths of a percent of their spread, never change the trained
    function. Tolerance: 2 % of the logits' spread and at most 1 in 40 predictions changed."""
    model, x, y = tiny_model("cnn")
    method = get_method("skip2-lora")
    config = FineTuneConfig(epochs=30, batch_size=8, rank=2, lr=0.05)
    exact = finetune(model, method, x, y, config)
    quantized = finetune(
        model, method, x, y, FineTuneConfig(**{**config.__dict__, "cache": "int8"})
    )
    start = exact.tuner.adapters()
    assert quantized.cache_bytes < exact.cache_bytes
    z_exact, z_int8 = exact.tuner.merged()(x), quantized.tuner.merged()(x)
    untrained = finetune(model, method, x, y, FineTuneConfig(**{**config.__dict__, "epochs": 1}))
    moved = np.abs(z_exact - untrained.tuner.merged()(x)).max()
    spread = z_exact.max() - z_exact.min()
    assert moved > 0.05 * spread  # training changed the function: the comparison means something
    assert np.abs(z_int8 - z_exact).max() <= 0.02 * spread
    assert np.mean(z_int8.argmax(1) != z_exact.argmax(1)) <= 1 / 40
    assert start.keys() == quantized.tuner.adapters().keys()


def test_every_tiny_model_builds_every_codec():
    for kind in TINY_SPECS:
        model, x, _ = tiny_model(kind)
        for codec in CODECS:
            cache = build_cache(model, x, codec)
            assert cache.decoded().shape == (len(x), sum(spec_of(model).taps()) + 3)
