"""Aggregation strategies: exact where they claim to be, biased where the design says so."""

from __future__ import annotations

import numpy as np
import pytest

from skip2fleet.server.federation.aggregation import (
    STRATEGIES,
    Rule,
    Update,
    clipped,
    trimmed_mean,
    weights,
)
from skip2fleet.server.federation.guard import check_aggregate
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.spec import cnn, mlp

SPEC = mlp(6, 3, hidden=5)
SKIP2 = get_method("skip2-lora")
UNCAPPED = Rule(max_weight=1e9)


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
    result = STRATEGIES["svd"]([a, b, wide], SKIP2, SPEC, UNCAPPED)
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
    result = STRATEGIES["svd"]([a, b, wide], method, spec, UNCAPPED)
    assert {p.layer for p in layout(method, spec, 2).pairs} == {0, 1, 2, 3}
    pairs = zip(kernel_products(a.theta, 1), kernel_products(b.theta, 1), strict=True)
    mean = [0.5 * pa + 0.5 * pb for pa, pb in pairs]
    for got, want in zip(kernel_products(result.per_device["c"], 2), mean, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# -- the coordinator's weights --------------------------------------------------------------------


def test_weights_follow_samples_or_are_equal():
    updates = [random_update(n, 2, s, i) for i, (n, s) in enumerate([("a", 100), ("b", 300)])]
    np.testing.assert_allclose(weights(updates, Rule()), [0.25, 0.75])
    np.testing.assert_allclose(weights(updates, Rule(weighting="equal")), [0.5, 0.5])


def test_no_device_weighs_more_than_max_weight_times_the_equal_share():
    """One device claims 20000 samples beside four of 300: capped at 2 / 5, the rest shared by
    the others' own weights (here equal)."""
    claims = [20_000, 300, 300, 300, 300]
    updates = [random_update(f"d{i}", 2, s, i) for i, s in enumerate(claims)]
    np.testing.assert_allclose(weights(updates, Rule()), [0.4, 0.15, 0.15, 0.15, 0.15])
    shares = weights(updates, Rule(max_weight=1.0))  # at 1: equal, whatever they claim
    np.testing.assert_allclose(shares, [0.2] * 5)
    mixed = [random_update(f"d{i}", 2, s, i) for i, s in enumerate([900, 600, 100, 100])]
    shares = weights(mixed, Rule(max_weight=1.5))  # cap 0.375: 900 and 600 both capped
    np.testing.assert_allclose(shares, [0.375, 0.375, 0.125, 0.125])
    assert shares.sum() == pytest.approx(1.0)


def test_fedavg_streams_in_float32_and_equals_the_float64_mean():
    updates = [random_update(f"d{i}", 2, 10 + i, i) for i in range(5)]
    result = STRATEGIES["fedavg"](updates, SKIP2, SPEC).per_device["d0"]
    assert result.dtype == np.float32
    shares = weights(updates, Rule())
    exact = sum(w * u.theta.astype(np.float64) for w, u in zip(shares, updates, strict=True))
    np.testing.assert_allclose(result, exact, rtol=1e-5, atol=1e-6)


def test_clip_scales_a_change_down_to_the_multiple_of_the_median_change():
    start = np.full(layout(SKIP2, SPEC, 2).size, 0.5, np.float32)
    changes = [0.001, 0.002, 0.003, 0.004, 0.1]  # norms well below 1
    updates = [Update(f"d{i}", start + np.float32(c), 1, 2) for i, c in enumerate(changes)]
    starts = {u.device: start for u in updates}
    got = [float(u.theta[0] - 0.5) for u in clipped(updates, starts, 2.0)]
    assert got == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.006], rel=1e-3)  # 2 x 0.003
    out = clipped(updates[1:], starts, 2.0)  # of four, the lower median: 0.003 again
    assert float(out[-1].theta[0] - 0.5) == pytest.approx(0.006, rel=1e-3)
    assert out[0] is updates[1]  # within the limit: untouched
    still = [Update(u.device, start.copy(), 1, 2) for u in updates[:3]] + updates[3:]
    assert clipped(still, starts, 2.0) == still  # a median change of 0 says nothing


# -- robust aggregation: Flower's arithmetic, over the products ----------------------------------


def flower_replies(arrays_per_device: list[dict[str, np.ndarray]]):
    """Replies as Flower's strategies take them: one ArrayRecord each, with a sample count."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    replies = []
    for arrays in arrays_per_device:
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )
        replies.append(Message(content=content, dst_node_id=1, message_type="train"))
    return replies


def parts(theta: np.ndarray, rank: int) -> dict[str, np.ndarray]:
    lay = layout(SKIP2, SPEC, rank)
    return {name: lay.part(theta, name) for name in lay.parts()}


@pytest.mark.parametrize(
    ("name", "trim"), [("median", 0.2), ("trimmed-mean", 0.2), ("trimmed-mean", 0.4)]
)
def test_median_and_trimmed_mean_equal_flowers_strategies_on_the_same_products(
    name, trim, task_identity
):
    from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg

    updates = [random_update(f"d{i}", 3, 10 * (i + 1), i) for i in range(5)]
    updates[4] = Update("d4", updates[4].theta * 1000, 10, 3)  # an attacker
    flower = (
        FedMedian()
        if name == "median"
        else FedTrimmedAvg()
        if trim == 0.2
        else FedTrimmedAvg(beta=trim)
    )
    arrays, _ = flower.aggregate_train(1, flower_replies([parts(u.theta, 3) for u in updates]))
    rule = Rule() if trim == 0.2 else Rule(trim=trim)  # 0.2: both defaults
    ours = STRATEGIES[name](updates, SKIP2, SPEC, rule)
    for part, value in arrays.items():
        # wide enough (rank 3 = C): the re-factorised products are the reduced ones
        got = parts(ours.per_device["d0"], 3)[part]
        np.testing.assert_allclose(got, value.numpy(), rtol=1e-4, atol=1e-5)
    assert ours.svd_relative_error < 1e-5


def test_trimmed_mean_cuts_int_trim_n_values_at_each_end():
    stack = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]])
    assert trimmed_mean(stack, 0.2)[0] == pytest.approx(3.0)  # (2 + 3 + 4) / 3
    assert trimmed_mean(stack, 0.19)[0] == pytest.approx(22.0)  # int(0.95) = 0: the mean
    assert trimmed_mean(stack, 0.4)[0] == pytest.approx(3.0)  # the median


# -- the aggregate's check -----------------------------------------------------------------------


def common_start(method=SKIP2, rank: int = 2, n: int = 4):
    """`n` updates, each a small change from one start, and the start."""
    start = np.random.default_rng(9).normal(size=layout(method, SPEC, rank).size)
    start = start.astype(np.float32)
    updates = [
        Update(f"d{i}", start + 0.1 * random_update(f"d{i}", rank, 10, i, method).theta, 10, rank)
        for i in range(n)
    ]
    return updates, {u.device: start for u in updates}, {u.device: rank for u in updates}


@pytest.mark.parametrize("name", ["fedavg", "svd", "median", "trimmed-mean"])
def test_every_strategys_aggregate_passes_its_check(name):
    updates, starts, ranks = common_start()
    updates[3] = Update("d3", starts["d3"] + 50 * (updates[3].theta - starts["d3"]), 10, 2)
    merged = STRATEGIES[name](updates, SKIP2, SPEC).per_device
    assert check_aggregate(merged, updates, starts, ranks, SKIP2, SPEC, name == "fedavg") is None


def test_a_non_finite_aggregate_is_refused_naming_the_device():
    updates, starts, ranks = common_start()
    merged = {u.device: u.theta.copy() for u in updates}
    merged["d2"][7] = np.inf
    why = check_aggregate(merged, updates, starts, ranks, SKIP2, SPEC, True)
    assert why == "the aggregate for d2 holds NaN or Inf"


@pytest.mark.parametrize(("factor", "sound"), [(0.99, True), (1.01, False)])
def test_fedavg_each_blocks_change_is_bounded_by_the_replies_root_sum_square(factor, sound):
    updates, starts, ranks = common_start()
    lay = layout(SKIP2, SPEC, 2)
    start = starts["d0"]
    theta = start.copy()
    for name, block in lay.blocks(theta).items():
        changes = [lay.blocks(u.theta - start)[name] for u in updates]
        rss = np.sqrt(sum(float(np.sum(c.astype(np.float64) ** 2)) for c in changes))
        block += changes[0] * np.float32(factor * rss / np.linalg.norm(changes[0]))
    why = check_aggregate({"d0": theta}, updates, starts, ranks, SKIP2, SPEC, True)
    assert (why is None) is sound, why
    if not sound:
        assert why.startswith("the aggregate for d0: skip tap 0 A changed by ")


def test_a_merge_of_one_reply_sits_on_the_bound_and_passes():
    """One reply: fedavg's merge is that reply, its change exactly the replies' root-sum-square;
    the float32 slack must widen the bound, never narrow it."""
    updates, starts, ranks = common_start(n=1)
    merged = STRATEGIES["fedavg"](updates, SKIP2, SPEC).per_device
    assert check_aggregate(merged, updates, starts, ranks, SKIP2, SPEC, True) is None


@pytest.mark.parametrize(("factor", "sound"), [(1.98, True), (2.02, False)])
def test_product_strategies_are_bounded_by_twice_the_root_sum_square(factor, sound):
    method = get_method("ft-all-lora")
    updates, starts, ranks = common_start(method)
    lay = layout(method, SPEC, 2)
    start = starts["d0"]
    changes = [lay.views(u.theta - start)["W0"] for u in updates]
    rss = np.sqrt(sum(float(np.sum(c.astype(np.float64) ** 2)) for c in changes))
    theta = start.copy()
    lay.views(theta)["W0"][...] += changes[0] * np.float32(
        factor * rss / np.linalg.norm(changes[0])
    )
    why = check_aggregate({"d0": theta}, updates, starts, ranks, method, SPEC, False)
    assert (why is None) is sound, why


def test_the_svd_error_is_the_discarded_singular_values_share():
    """All rank 1: the error is sqrt(sum of the discarded s^2 / sum of all s^2) over the pairs
    of the mean products, computed here from NumPy's SVD of the means."""
    a, b = random_update("a", 1, 10, 0), random_update("b", 1, 10, 1)
    a, b = (Update(u.device, u.theta * 0.1, 10, 1) for u in (a, b))  # products' norms below 1
    result = STRATEGIES["svd"]([a, b], SKIP2, SPEC)
    discarded = total = 0.0
    for pa, pb in zip(products(a.theta, 1), products(b.theta, 1), strict=True):
        s = np.linalg.svd(0.5 * pa.astype(np.float64) + 0.5 * pb, compute_uv=False)
        discarded += float(np.sum(s[1:] ** 2))
        total += float(np.sum(s**2))
    assert result.svd_relative_error == pytest.approx(np.sqrt(discarded / total), rel=1e-4)


def test_the_svd_error_of_all_zero_products_is_zero():
    zero = Update("a", np.zeros(layout(SKIP2, SPEC, 1).size, np.float32), 10, 1)
    assert (
        STRATEGIES["svd"]([zero, Update("b", zero.theta, 10, 1)], SKIP2, SPEC).svd_relative_error
        == 0.0
    )


@pytest.mark.parametrize("name", ["svd", "median", "trimmed-mean"])
def test_a_merge_of_one_reply_is_that_reply(name):
    alone = random_update("a", 3, 10, 0)
    merged = STRATEGIES[name]([alone], SKIP2, SPEC).per_device["a"]
    for got, want in zip(products(merged, 3), products(alone.theta, 3), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
