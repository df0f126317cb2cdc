"""`fleet bench tune`: what it holds out of the training data, and which rates it may choose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.server.bench import tune
from skip2fleet.server.bench.tune import stable_rates, validation_split
from skip2fleet.shared.datasets import Split


def test_the_held_out_part_is_a_quarter_of_each_class_in_whole_runs():
    y = np.repeat([0, 1, 2], [64, 40, 33])
    x = np.arange(len(y), dtype=float)[:, None]  # a sample's row number, to find it again
    train, held = validation_split(Split(x, y))
    assert sorted(np.concatenate([train.x, held.x]).ravel()) == list(range(len(y)))
    for label, size in ((0, 64), (1, 40), (2, 33)):
        rows = held.x[held.y == label].ravel().astype(int)
        first = int(np.flatnonzero(y == label)[0])
        assert 0.2 * size <= len(rows) <= 0.3 * size
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
        assert [run[0] - first for run in runs] == list(range(24, size, 32))
        assert all(len(run) == min(8, first + size - run[0]) for run in runs)


def test_a_rate_may_be_chosen_only_when_it_and_the_next_larger_one_never_diverged():
    calm = {0.003: [], 0.01: [], 0.03: [], 0.1: []}
    assert stable_rates(calm) == [0.003, 0.01, 0.03]
    assert stable_rates(calm | {0.1: ["ft-all-lora"]}) == [0.003, 0.01]
    assert stable_rates(calm | {0.01: ["dora"]}) == [0.03]
    assert stable_rates({0.003: ["ft-all"], 0.01: ["ft-all"]}) == [0.003]


def test_bench_tune_writes_its_choice_away_from_a_rate_that_diverges(tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "PRETRAIN_CHECKPOINTS", (1, 2))
    monkeypatch.setattr(tune, "FINETUNE_CHECKPOINTS", (1, 2))
    monkeypatch.setattr(tune, "LRS", (0.01, 0.03, 1e4))  # 1e4 diverges: 0.03 has no margin
    out = tmp_path / "tune"
    result = CliRunner().invoke(
        app,
        ["bench", "tune", "--tasks", "generated", "--models", "mlp",
         "--methods", "ft-all,skip2-lora", "--out-dir", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (pair,) = json.loads((out / "tune.json").read_text())["pairs"]
    assert pair["diverged"]["10000.0"] and not pair["diverged"]["0.03"]
    assert pair["eligible_lrs"] == [0.01] and pair["lr"] == 0.01
    assert pair["pretrain_epochs"] in (1, 2) and pair["epochs"] in (1, 2)
    assert set(pair["finetune_scores"]["0.01 2"]) == {"ft-all", "skip2-lora"}
    assert "| 10000.0 | 0.00 | 0.00 | ft-all, skip2-lora | no |" in (out / "tune.md").read_text()


def test_the_reports_defaults_are_what_the_committed_tune_reports_chose():
    """`CHOSEN` is copied by hand from docs/results/tune/; a copying slip would quietly run the
    edge-PEFT report at a point no validation split chose."""
    chosen = {}
    for report in (Path(__file__).parent.parent / "docs/results/tune").glob("*.json"):
        for pair in json.loads(report.read_text())["pairs"]:
            point = (pair["epochs"], pair["pretrain_epochs"], pair["lr"])
            chosen[(pair["task"], pair["model"])] = point
    assert chosen == tune.CHOSEN
