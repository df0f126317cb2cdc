"""The `fleet` command line: the main jobs on generated data, JSON outputs, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.shared.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def fleet(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_the_commands():
    result = fleet("--help")
    assert result.exit_code == 0
    for command in ("pretrain", "finetune", "bench"):
        assert command in result.output


def test_pretrain_then_finetune_improves_accuracy(tmp_path):
    base = tmp_path / "base.npz"
    result = fleet("pretrain", "--out", str(base), "--epochs", "10")
    assert result.exit_code == 0, result.output
    assert "sha256" in result.output
    out, report = tmp_path / "adapters.npz", tmp_path / "ft.json"
    result = fleet(
        "finetune", "--base", str(base), "--epochs", "50", "--out", str(out), "--json", str(report)
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["accuracy_after"] > figures["accuracy_before"] + 10
    assert figures["cache_bytes"] == figures["samples"] * (64 + 96 + 96 + 3) * 4
    with np.load(out) as adapters:
        assert set(adapters.files) >= {"A_skip", "B_skip", "meta.base_sha256"}


@pytest.mark.parametrize("model", ["cnn", "dscnn"])
def test_finetune_a_built_in_cnn(tmp_path, model):
    report = tmp_path / "ft.json"
    result = fleet("finetune", "--model", model, "--epochs", "3", "--json", str(report))
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["model"].startswith("1x64 -> conv1d5:16")
    assert figures["cache_bytes"] == figures["samples"] * (64 + 16 * 32 + 32 * 16 + 64 * 8 + 3) * 4


def test_bench_timing_writes_json_markdown_and_chart(tmp_path):
    report = tmp_path / "timing.json"
    result = fleet(
        "bench",
        "timing",
        "--epochs",
        "2",
        "--repeats",
        "2",
        "--out-dir",
        str(tmp_path),
        "--json",
        str(report),
    )
    assert result.exit_code == 0, result.output
    timing = json.loads(report.read_text())
    assert timing["dataset"] == "generated" and timing["batch_size"] == 20
    assert set(timing["methods"]) == set(METHODS)
    for row in timing["methods"].values():
        assert set(row["train_batch_ms"]) == {"forward", "backward", "update", "total"}
        assert row["train_batch_ms"]["total"] > 0 and row["predict_sample_ms"] > 0
    flops = {name: row["flops_per_step"] for name, row in timing["methods"].items()}
    assert flops["skip2-lora"] < flops["ft-last"] < flops["lora-all"] < flops["ft-all-lora"]
    assert (tmp_path / "timing-generated.md").read_text().count("|") > 50
    assert (tmp_path / "timing-generated.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_accuracy_writes_json(tmp_path):
    report = tmp_path / "accuracy.json"
    result = fleet(
        "bench",
        "accuracy",
        "--trials",
        "2",
        "--epochs",
        "30",
        "--methods",
        "ft-last,skip2-lora",
        "--pretrain-epochs",
        "5",
        "--out-dir",
        str(tmp_path),
        "--json",
        str(report),
    )
    assert result.exit_code == 0, result.output
    accuracy = json.loads(report.read_text())
    assert accuracy["trials"] == 2 and len(accuracy["before"]["trials"]) == 2
    assert set(accuracy["methods"]) == {"ft-last", "skip2-lora"}
    assert accuracy["methods"]["skip2-lora"]["mean"] > accuracy["before"]["mean"]
    assert (tmp_path / "accuracy-generated.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["finetune", "--method", "lora-first"], "unknown method 'lora-first'"),
        (["finetune", "--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["pretrain", "--dataset", "har", "--data-dir", "/nonexistent"], "does not exist"),
        (["finetune", "--base", "/nonexistent/base.npz"], "no such base model file"),
        (["bench", "timing", "--methods", "ft-all,bogus"], "unknown method 'bogus'"),
        (["finetune", "--lr", "50", "--epochs", "5", "--method", "ft-all"], "diverged"),
        (["finetune", "--lr", "0"], "not above 0"),
        (["finetune", "--rank", "100000"], "100000 is not in the range 1<=x<=256"),
        (["simulate", "--config", "/nonexistent/fleet.yaml"], "no such fleet file"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")


def test_bad_input_writes_nothing(tmp_path):
    out = tmp_path / "adapters.npz"
    result = fleet(
        "finetune", "--method", "ft-all", "--lr", "50", "--epochs", "5", "--out", str(out)
    )
    assert result.exit_code == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_base_for_other_features_is_refused(tmp_path, data_dir):
    base = tmp_path / "base.npz"
    assert fleet("pretrain", "--out", str(base), "--epochs", "1").exit_code == 0
    result = runner.invoke(
        app,
        [
            "finetune",
            "--base",
            str(base),
            "--dataset",
            "har",
            "--data-dir",
            str(data_dir),
            "--epochs",
            "1",
        ],
    )
    assert result.exit_code == 2
    assert "takes 64 values per sample, har has 220" in result.output


def test_pretrain_writes_under_runs_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fleet("pretrain", "--epochs", "1").exit_code == 0
    assert len(list(tmp_path.glob("runs/pretrain-generated-*/base.npz"))) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]  # nothing else in the folder
    assert (ROOT / ".gitignore").read_text().count("/runs/") == 1
