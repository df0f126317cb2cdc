"""Aggregation strategies: exact where they claim to be, biased where the design says so."""

from __future__ import annotations

import numpy as np

from skip2fleet.server.federation.aggregation import STRATEGIES, Update
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.spec import cnn, mlp

SPEC = mlp(6, 3, hidden=5)
SKIP2 = get_method("skip2-lora")


def random_update(name: str, rank: int, samples: int, seed: int, method=SKIP2) -> Update:
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=layout(method, SPEC, rank).size).astype(np.float32)
    return Update(name, theta, samples, rank)


def products(theta: np.ndarray, rank: int, method=SKIP2) -> list[np.ndarray]:
    arrays = layout(method, SPEC, rank).views(theta)
    return [arrays[p.a][p.a_rows] @ arrays[p.b][p.b_rows] for p in layout(method, SPEC, rank).pairs]


def test_none_sends_nothing_back():
    updates = [random_update("a", 2, 10, 0), random_update("b", 2, 30, 1)]
    assert STRATEGIES["none"](updates, SKIP2, SPEC).per_device == {}


def test_fedavg_is_the_sample_weighted_mean():
    a, b = random_update("a", 2, 10, 0), random_update("b", 2, 30, 1)
    result = STRATEGIES["fedavg"]([a, b], SKIP2, SPEC).per_device
    np.testing.assert_allclose(result["a"], 0.25 * a.theta + 0.75 * b.theta, rtol=1e-6)
    assert result["a"] is result["b"]


def test_svd_recovers_the_exact_mean_product_when_the_rank_allows():
    """Two rank-1 devices re-factorised at rank 2: the mean of the products is exact."""
    a, b = random_update("a", 1, 10, 0), random_update("b", 1, 30, 1)
    wide = Update("c", random_update("c", 2, 1, 2).theta, 1e-9, 2)  # takes the rank-2 result
    result = STRATEGIES["svd"]([a, b, wide], SKIP2, SPEC)
    mean = [
        0.25 * pa + 0.75 * pb
        for pa, pb in zip(products(a.theta, 1), products(b.theta, 1), strict=True)
    ]
    for got, want in zip(products(result.per_device["c"], 2), mean, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # at rank 1 the same mean cannot be represented: the error is reported, not hidden
    assert result.svd_relative_error > 0.01


def test_svd_is_unbiased_where_fedavg_is_not():
    a, b = random_update("a", 2, 10, 0), random_update("b", 2, 10, 1)
    exact = [
        0.5 * pa + 0.5 * pb
        for pa, pb in zip(products(a.theta, 2), products(b.theta, 2), strict=True)
    ]
    fed = products(STRATEGIES["fedavg"]([a, b], SKIP2, SPEC).per_device["a"], 2)
    err = lambda got: sum(np.linalg.norm(g - e) for g, e in zip(got, exact, strict=True))  # noqa: E731
    svd = STRATEGIES["svd"]([a, b], SKIP2, SPEC)
    assert err(products(svd.per_device["a"], 2)) < err(fed)


def test_svd_averages_plain_arrays_of_lora_methods():
    method = get_method("ft-all-lora")
    a, b = random_update("a", 2, 10, 0, method), random_update("b", 2, 10, 1, method)
    views = layout(method, SPEC, 2).views
    merged = views(STRATEGIES["svd"]([a, b], method, SPEC).per_device["a"])
    mean_w0 = 0.5 * (views(a.theta)["W0"] + views(b.theta)["W0"])
    np.testing.assert_allclose(merged["W0"], mean_w0, rtol=1e-6)


def test_svd_keeps_the_rank_when_the_product_has_fewer_columns():
    """A skip product is d x C; with C = 3 < rank 4 the fourth column of A stays zero."""
    a, b = random_update("a", 4, 10, 0), random_update("b", 4, 10, 1)
    result = STRATEGIES["svd"]([a, b], SKIP2, SPEC)
    exact = [
        0.5 * pa + 0.5 * pb
        for pa, pb in zip(products(a.theta, 4), products(b.theta, 4), strict=True)
    ]
    for got, want in zip(products(result.per_device["a"], 4), exact, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert result.svd_relative_error < 1e-5


def test_svd_merges_conv_adapters_exactly_when_the_rank_allows():
    """LoRA beside convolutions: A is (C_in * k) x r, B r x C_out, the product the kernel's."""
    spec, method = cnn(2, 12, 3, widths=(3, 4, 5)), get_method("lora-all")

    def update(name: str, rank: int, seed: int) -> Update:
        size = layout(method, spec, rank).size
        return Update(name, np.random.default_rng(seed).normal(size=size), 10, rank)

    def kernel_products(theta: np.ndarray, rank: int) -> list[np.ndarray]:
        arrays = layout(method, spec, rank).views(theta)
        return [arrays[p.a] @ arrays[p.b] for p in layout(method, spec, rank).pairs]

    a, b, wide = update("a", 1, 0), update("b", 1, 1), update("c", 2, 2)
    wide = Update("c", wide.theta, 1e-9, 2)
    result = STRATEGIES["svd"]([a, b, wide], method, spec)
    assert {p.layer for p in layout(method, spec, 2).pairs} == {0, 1, 2, 3}
    pairs = zip(kernel_products(a.theta, 1), kernel_products(b.theta, 1), strict=True)
    mean = [0.5 * pa + 0.5 * pb for pa, pb in pairs]
    for got, want in zip(kernel_products(result.per_device["c"], 2), mean, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
