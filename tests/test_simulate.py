"""Federated rounds on Flower's Simulation Engine (Ray, in this process), end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.client.clientapp import train as real_train
from skip2fleet.server import options as opt
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.federation.simulate import run_simulation
from skip2fleet.shared import model as base_model
from skip2fleet.shared.config import as_yaml_dict
from skip2fleet.shared.protocol import THETA, NodeConfig, Part
from skip2fleet.shared.spec import mlp

runner = CliRunner()


def simulate(*args: str) -> dict:
    result = runner.invoke(app, ["simulate", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_generated_fleet_on_an_int4_cache_improves_and_only_adapters_travel_after_round_1(tmp_path):
    report = tmp_path / "sim.json"
    simulate(
        "--devices", "3", "--rounds", "2", "--cache", "int4",
        "--out", str(tmp_path / "run"), "--json", str(report),
    )  # fmt: skip
    summary = json.loads(report.read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for device in summary["rounds"][-1]["devices"].values():
        assert device["acc_after"] > device["acc_before"] + 10  # on a 4-bit cache
    samples, cache = (
        summary["rounds"][0]["devices"]["sim-1"][k] for k in ("samples", "cache_bytes")
    )
    assert 0 < cache <= 0.15 * samples * (64 + 96 + 96 + 3) * 4  # int4, not f32
    full = summary["full_model_bytes"]
    first, second = (r["downlink_bytes"] for r in summary["rounds"])
    assert min(first.values()) > full  # round 1 carries the base
    assert max(second.values()) < full / 20  # round 2 only the plan
    assert (tmp_path / "run" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_har_devices_send_at_most_a_fifteenth_of_the_model(tmp_path, data_dir):
    report = tmp_path / "har.json"
    simulate(
        "--dataset",
        "har",
        "--data-dir",
        str(data_dir),
        "--devices",
        "5",
        "--rounds",
        "2",
        "--out",
        str(tmp_path / "run"),
        "--json",
        str(report),
    )
    summary = json.loads(report.read_text())
    last = summary["rounds"][-1]["devices"]
    assert sorted(last) == ["sim-1", "sim-2", "sim-3", "sim-4", "sim-5"]
    mean = {key: np.mean([d[key] for d in last.values()]) for key in ("acc_before", "acc_after")}
    assert mean["acc_after"] > mean["acc_before"]
    assert max(d["uplink_bytes"] for d in last.values()) <= summary["full_model_bytes"] / 15


def poisoning_client(bad_partition: int) -> ClientApp:
    """The real ClientApp, except that one device sends NaN adapters."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        reply = real_train(msg, context)
        partition = int(context.node_config[NodeConfig.PARTITION_ID])
        if partition == bad_partition and reply.has_content():
            vector = reply.content[Part.ADAPTERS][THETA].numpy().copy()
            vector[3] = np.nan
            reply.content[Part.ADAPTERS] = ArrayRecord({THETA: Array(vector)})
        return reply

    return client


def test_a_device_sending_nan_is_refused_and_does_not_poison_the_average(tmp_path):
    fleet = opt.resolve_fleet(None, 3, 1, "generated", None, "fedavg")
    fleet = dataclasses.replace(
        fleet, federation=dataclasses.replace(fleet.federation, min_devices=2)
    )
    base = base_model.init_model(mlp(64, 3), np.random.default_rng(0))
    folder = RunFolder.create(tmp_path / "run", as_yaml_dict(fleet), base)
    run_simulation(folder, 3, client_app=poisoning_client(1))
    result = folder.round_result(1)
    assert result["refused"] == {"sim-2": "adapters hold NaN or Inf"}
    assert sorted(result["devices"]) == ["sim-1", "sim-3"]
    outgoing = folder.outgoing(1)  # sim-2 starts round 2 where it started round 1
    assert sorted(outgoing) == ["sim-1", "sim-2", "sim-3"]
    assert all(np.isfinite(v).all() for v in outgoing.values())
    assert np.array_equal(outgoing["sim-1"], outgoing["sim-3"])
    assert not np.array_equal(outgoing["sim-1"], outgoing["sim-2"])


def test_resume_continues_after_the_last_completed_round(tmp_path):
    run = tmp_path / "run"
    simulate("--devices", "2", "--rounds", "1", "--aggregation", "svd", "--out", str(run))
    first = (run / "rounds" / "001" / "round.json").read_text()
    result = simulate("--resume", str(run), "--rounds", "2")
    assert (run / "rounds" / "001" / "round.json").read_text() == first
    second = json.loads((run / "rounds" / "002" / "round.json").read_text())
    assert sorted(second["devices"]) == ["sim-1", "sim-2"]
    assert second["svd_relative_error"] is not None
    assert "    2 " in result.output


def test_bench_federated_compares_aggregations_over_trials_with_a_base_each(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "federated", "--devices", "2", "--rounds", "1", "--trials", "2"]
    args += ["--aggregations", "none,svd", "--workdir", str(tmp_path / "w"), "--json", str(out)]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert list(results["after"]) == ["none", "svd"]
    before = results["before"]["sim-1"]
    assert len(before) == 2 and before[0] != before[1]  # a new base per trial
    run = RunFolder(tmp_path / "w" / "trial2-svd")
    assert (
        run.round_result(1)["devices"]["sim-1"]["acc_after"] == results["after"]["svd"]["sim-1"][1]
    )
    assert "| sim-1 (0) |" in result.output and "(2/2)" in result.output


def test_bench_federated_names_an_unknown_aggregation(tmp_path):
    args = ["bench", "federated", "--aggregations", "none,mean", "--workdir", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "unknown mean" in result.output


def test_bench_byzantine_names_the_attacker_and_keeps_the_aggregate_finite(tmp_path):
    """The Byzantine bench, small: 3 generated devices, 1 round, median; the last device claims
    0 samples (NaN and the other attacks: `fleet bench byzantine`, docs/robustness.md)."""
    out = tmp_path / "byzantine.json"
    args = ["bench", "byzantine", "--tasks", "generated", "--aggregations", "median"]
    args += ["--attacks", "samples-0", "--devices", "3", "--rounds", "1"]
    result = runner.invoke(app, [*args, "--workdir", str(tmp_path / "w"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["attack"]: row for row in json.loads(out.read_text())}
    assert rows["samples-0"]["refused"] == "sample count 0 is not an integer in [1, 20000]"
    for row in rows.values():
        assert row["finite"] and row["completed"] and row["aggregation"] == "median"
        assert row["honest_accuracy"] is not None and row["clean_accuracy"] is not None
