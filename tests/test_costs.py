"""What a step costs: FLOPs by category from the products the engine calls, peak memory measured
with tracemalloc beside the arrays each category holds, and the `fleet bench peft` report."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import pytest

from skip2fleet.server.bench import peft
from skip2fleet.server.bench.costs import MEMORY_CATEGORIES, measure_memory, step_flops
from skip2fleet.server.bench.peft import measure_pair, variants
from skip2fleet.server.bench.tune import CHOSEN
from skip2fleet.shared.engine import FineTuner
from skip2fleet.shared.flops import CATEGORIES, svd_flops
from skip2fleet.shared.methods import METHODS, get_method
from skip2fleet.shared.peft.galore import INTERVAL
from skip2fleet.shared.train import FineTuneConfig
from tests.conftest import tiny_model
from tests.test_cli import fleet


def tuner_for(kind: str, name: str, batch: int = 4) -> FineTuner:
    model, x, y = tiny_model(kind)
    tuner = FineTuner(model, get_method(name), rank=2, batch_size=batch)
    tuner.attach(x, y)
    return tuner


def test_skip2_step_flops_by_category_by_hand(tiny):
    flops = step_flops(tuner_for("mlp", "skip2-lora"))
    # forward: x_t (4 x n_t) @ A_t (n_t x 2) over taps of 7 + 5 + 5 = 17, H @ B (6x3); no base,
    # so no input gradient; weight gradients: H.T @ dz (6x4x3), dz @ B.T (4x3x6),
    # x_t.T @ dH_t (n_t x 4 x 2); update: a multiply and an add per trainable (A 17x2, B 6x3)
    assert flops["forward"] == 2 * 4 * (17 * 2 + 6 * 3)
    assert flops["input_grad"] == 0
    assert flops["weight_grad"] == 2 * 4 * (6 * 3 + 3 * 6 + 17 * 2)
    assert flops["update"] == 2 * (17 * 2 + 6 * 3)
    assert flops["svd"] == 0
    assert flops["total"] == sum(flops[c] for c in CATEGORIES)


def test_categories_follow_what_each_method_back_propagates():
    for kind in ("mlp", "cnn", "dscnn"):
        flops = {name: step_flops(tuner_for(kind, name)) for name in METHODS}
        assert flops["lora-all"]["input_grad"] > 0 < flops["ft-all"]["input_grad"]
        assert flops["ft-last"]["input_grad"] == 0  # the head's input needs no gradient
        if kind != "dscnn":  # (DoRA adapts no depthwise layer)
            # DoRA needs the full weight gradient, then its adapters' on top
            assert flops["dora"]["weight_grad"] > flops["ft-all"]["weight_grad"]
        assert flops["galore"]["svd"] > 0 == flops["ft-all"]["svd"]
        assert flops["galore"]["forward"] == flops["ft-all"]["forward"]


def test_galore_svd_is_amortised_over_its_interval():
    tuner = tuner_for("mlp", "galore")
    shapes = [g.shape for g in tuner.optimizer.grads]
    assert step_flops(tuner)["svd"] == sum(svd_flops(*s) for s in shapes) // INTERVAL


def test_measured_peak_holds_the_breakdown_and_little_else():
    model, x, y = tiny_model("cnn")
    x = np.repeat(x, 40, axis=0)  # 1,600 samples: the data dominates, as on a device (int4 too)
    y = np.repeat(y, 40)
    for name in METHODS:
        for codec in ("f32", "int4"):
            memory = measure_memory(model, get_method(name), x, y, 20, 2, codec)
            assert set(memory["memory"]) == set(MEMORY_CATEGORIES)
            assert memory["sum"] <= memory["peak_bytes"] <= 2 * memory["sum"], (name, codec)
    f32 = measure_memory(model, get_method("skip2-lora"), x, y, 20, 2, "f32")
    int4 = measure_memory(model, get_method("skip2-lora"), x, y, 20, 2, "int4")
    assert int4["memory"]["data"] < f32["memory"]["data"] / 4
    assert int4["peak_bytes"] < f32["peak_bytes"]
    one = measure_memory(model, get_method("ft-all"), x, y, 1, 2, "f32")
    twenty = measure_memory(model, get_method("ft-all"), x, y, 20, 2, "f32")
    assert one["memory"]["activations"] < twenty["memory"]["activations"]
    assert f32["memory"]["optimizer"] == 0  # plain SGD keeps no state


def test_bench_peft_writes_rows_tables_and_charts(tmp_path, monkeypatch):
    out = tmp_path / "peft"
    monkeypatch.setitem(CHOSEN, ("generated", "cnn"), (2, 2, 0.03))  # as `fleet bench tune` would
    result = fleet(
        "bench", "peft", "--tasks", "generated", "--models", "mlp,cnn", "--trials", "1",
        "--epochs", "2", "--pretrain-epochs", "2", "--out-dir", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "peft.json").read_text())
    rows = report["rows"]
    assert len(rows) == 2 * (len(METHODS) + 2)  # Skip2-LoRA three times, with each codec
    keys = {"task", "model", "method", "cache", "accuracy", "flops", "peak_bytes", "memory"}
    assert keys | {"train_batch_ms", "params"} <= set(rows[0])
    caches = {r["cache"]: r["cache_bytes"] for r in rows if r["method"] == "skip2-lora"}
    assert caches["int4"] < caches["int8"] < caches["f32"]
    for row in rows:
        assert 0 <= row["accuracy"]["mean"] <= 100 and row["train_batch_ms"] > 0
        assert row["peak_bytes"] >= row["memory_sum"] > 0
        assert row["batch1"]["peak_bytes"] > 0
    assert {(r["model"], r["lr"]) for r in rows} == {("mlp", 0.01), ("cnn", 0.03)}
    assert (out / "peft.md").read_text().count("## generated ·") == 2
    for chart in ("accuracy-memory", "flops"):
        assert (out / f"peft-generated-{chart}.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_peft_names_an_unknown_model(tmp_path):
    result = fleet("bench", "peft", "--models", "mlp,resnet", "--out-dir", str(tmp_path))
    assert result.exit_code == 2 and "unknown model resnet" in result.output


def test_bench_peft_hands_over_its_rows_after_every_trial():
    """What a long report has measured is written after each trial (a stopped run keeps it)."""
    seen = []
    chosen = variants([get_method("lora-all")])
    config = FineTuneConfig(epochs=1, batch_size=20)
    rows = measure_pair("generated", "mlp", chosen, config, 2, 1, None, on_trial=seen.append)
    assert [[r["trials"] for r in partial] for partial in seen] == [[1], [2]]
    assert seen[-1] == rows and len(rows[0]["accuracy"]["trials"]) == 2


def fail_the_cnn_once_the_mlp_is_written(report: Path, task: str, model: str, *args) -> list:
    """A pair that dies after the other one finished: it waits (in its worker) for the report the
    finished pair should have left, so the test does not race the pool."""
    if model == "mlp":
        return measure_pair(task, model, *args)
    deadline = time.monotonic() + 60
    while not report.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    raise RuntimeError("the cnn pair died")


def test_bench_peft_with_jobs_keeps_the_pairs_finished_before_one_died(tmp_path, monkeypatch):
    out = tmp_path / "peft"
    dying = functools.partial(fail_the_cnn_once_the_mlp_is_written, out / "peft.json")
    monkeypatch.setattr(peft, "measure_pair", dying)  # the pool's workers fork with it
    with pytest.raises(RuntimeError, match="the cnn pair died"):
        fleet(
            "bench", "peft", "--tasks", "generated", "--models", "mlp,cnn", "--methods",
            "lora-all", "--trials", "1", "--epochs", "1", "--pretrain-epochs", "1", "--jobs", "2",
            "--out-dir", str(out),
        )  # fmt: skip
    report = json.loads((out / "peft.json").read_text())
    assert report["partial"] and {r["model"] for r in report["rows"]} == {"mlp"}
