"""Faults injected into a real loopback deployment (SuperLink with TLS and node authentication,
three SuperNodes), each case asserting what was kept and what was lost. The figures docs/faults.md
quotes are printed as `FAULTS ...` lines (run with `-s`).

One deployment serves the module: a device offline at the start of a run, the same device
SIGKILLed mid-round and brought back by the test acting as its supervisor (the services' 10 s
back-off), a second `--resume` while the run is active, the SuperLink SIGKILLed and restarted and
the run resumed; then a run with poisoned replies, whose folder the corrupt-file cases copy. The
full disk and the oversized reply need no deployment. Every process is stopped by its group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, Metadata, RecordDict
from flwr.app.message.message import make_message
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.server.federation.aggregation import STRATEGIES, Update
from skip2fleet.server.federation.exchange import Exchange
from skip2fleet.server.federation.run import follow, start_run, stop_orphaned_serverapp
from skip2fleet.server.federation.runs import RunFolder
from skip2fleet.server.federation.validation import Roster, validate
from skip2fleet.server.operations.loopback import (
    free_port,
    loopback_deployment,
    prometheus_query,
    start_prometheus,
    start_pushgateway,
    start_superlink,
    start_supernode,
    wait_for,
)
from skip2fleet.server.operations.superlink import CONNECTION, flower_env, flwr
from skip2fleet.server.training.pretraining import fleet_base
from skip2fleet.shared import model as base_model
from skip2fleet.shared.config import as_yaml_dict, load_config
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.protocol import DEVICE_NAME, THETA, Accept, Figures, Part
from skip2fleet.shared.records import figures_record
from skip2fleet.shared.services import FAULTY_CLIENTAPP
from skip2fleet.shared.spec import mlp

DEVICES = ["pi-1", "pi-2", "pi-3"]
RESTART_S = 10  # the services' back-off (ansible/roles/service/templates)
TIMEOUT_S = 90  # round timeout: longer than Flower's heartbeat verdict (about 50 s)
PULLED = "Received successfully"  # a SuperNode's log line once it holds a message
runner = CliRunner()


def figure(name: str, value: object) -> None:
    print(f"FAULTS {name}: {value}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Three registered devices; pi-3's SuperNode is left for the first case to start."""
    root = tmp_path_factory.mktemp("faults")
    gateway, prometheus = free_port(), free_port()
    config = {
        "coordinator": {
            "address": "127.0.0.1",
            "port": free_port(),
            "superlink_port": free_port(),
            "state_dir": str(root / "state"),
            "tls": True,
            "pushgateway": f"127.0.0.1:{gateway}",
        },
        "training": {"epochs": 5, "pretrain_epochs": 5},
        "federation": {
            "rounds": 100,  # the first case ends its run itself, with the SuperLink
            "aggregation": "fedavg",
            "min_devices": 1,
            "round_timeout_s": TIMEOUT_S,
        },
        "devices": [{"name": n, "data": {"partition": i}} for i, n in enumerate(DEVICES)],
    }
    path = root / "fleet.yaml"
    path.write_text(yaml.safe_dump(config))
    fleet = load_config(path)
    (root / "prometheus").mkdir()
    (root / "prometheus" / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "scrape_configs": [
                    {
                        "job_name": "pushgateway",
                        "honor_labels": True,
                        "scrape_interval": "1s",
                        "static_configs": [{"targets": [f"127.0.0.1:{gateway}"]}],
                    }
                ]
            }
        )
    )
    with loopback_deployment(fleet, root, offline=["pi-3"]) as processes:
        yield fleet, path, processes, root, (gateway, prometheus)


def rounds_of(run: Path) -> list[dict]:
    folder = RunFolder(run)
    return [folder.round_result(n) for n in folder.completed_rounds()]


def file_hashes(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((run / "rounds").rglob("*"))
        if p.is_file()
    }


def online(fleet) -> list[int]:
    nodes = flwr(fleet, "supernode", "list", CONNECTION)["nodes"]
    return [n["node-id"] for n in nodes if n["status"] == "online"]


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_late_device_killed_device_superlink_restart_and_resume(deployment):
    fleet, path, processes, root, (gateway, prometheus) = deployment
    run = root / "run-a"
    command = [sys.executable, "-m", "skip2fleet.cli", "run", "--config", str(path)]
    follower = processes.start("fleet-run", [*command, "--out", str(run)], flower_env(fleet))

    # pi-3 is offline when the run starts, and the Pushgateway is down for round 1
    wait_for(lambda: len(rounds_of(run)) >= 1, 180, "round 1")
    first = rounds_of(run)[0]
    assert sorted(first["devices"]) == ["pi-1", "pi-2"]
    assert first["missing_why"] == {"pi-3": "offline when the round started"}
    start_pushgateway(processes, gateway)
    start_prometheus(processes, root / "prometheus", prometheus)

    joined_at, in_flight = time.monotonic(), len(rounds_of(run)) + 1
    start_supernode(processes, fleet, root, "pi-3")
    joined = wait_for(
        lambda: next((r for r in rounds_of(run) if "pi-3" in r["devices"]), None), 120, "pi-3"
    )
    assert joined["round"] <= in_flight + 1  # used from the round after the one in flight
    assert (root / "devices" / "pi-3" / "base").is_dir()  # it was sent the base when it joined
    figure("late device trains from round", f"{joined['round']} (in flight at join: {in_flight})")
    figure("late device: seconds from start to trained", f"{time.monotonic() - joined_at:.0f}")

    # a second `--resume` while the run is active is refused, naming the folder
    second = runner.invoke(app, ["run", "--resume", str(run)])
    assert second.exit_code == 2 and "still active" in second.output and str(run) in second.output

    # pi-3 SIGKILLed mid-round and its base wiped; the test restarts it as its supervisor would
    # (every 10 s); it says it lacks the base, and gets it with the next plan
    # killed only once it holds the plan of the round in flight: killed before pulling it, its
    # restarted process would pull that plan and refuse it for lack of the base (a second case)
    done = len(rounds_of(run))
    wait_for(lambda: len(rounds_of(run)) > done, 60, "the next round")
    pulled = processes.log("pi-3").count(PULLED)
    wait_for(lambda: processes.log("pi-3").count(PULLED) > pulled, 60, "pi-3 pulling its plan")
    killed_round, killed_at = len(rounds_of(run)) + 1, time.monotonic()
    kill_group(processes.started["pi-3"])
    shutil.rmtree(root / "devices" / "pi-3" / "base")
    node, restarts, down_since = None, 0, killed_at
    while not any(r["round"] > killed_round and "pi-3" in r["devices"] for r in rounds_of(run)):
        assert time.monotonic() - killed_at < 240, "pi-3 never trained again"
        if node is not None and node.poll() is not None and down_since is None:
            down_since = time.monotonic()  # refused ("still online"): it exits, as a service would
        if down_since is not None and time.monotonic() - down_since >= RESTART_S:
            restarts += 1
            node = start_supernode(processes, fleet, root, "pi-3", f"pi-3-restart{restarts}")
            down_since = None
        time.sleep(0.5)
    returned_s = time.monotonic() - killed_at
    lost = RunFolder(run).round_result(killed_round)
    assert sorted(lost["devices"]) == ["pi-1", "pi-2"], lost  # the round completed without it
    assert lost["missing"] == ["pi-3"] and lost["refused"] == {}  # named once
    # Flower's heartbeat verdict, unless the restarted SuperNode came back first: then its plan,
    # pulled by the killed process, is simply never answered
    why = lost["missing_why"]["pi-3"]
    assert why.startswith("lost: no heartbeat") or why == f"no answer within {TIMEOUT_S} s", why
    asked = [r for r in rounds_of(run) if "no base model" in r["refused"].get("pi-3", "")]
    assert (
        len(asked) == 1 and "pi-3" in RunFolder(run).round_result(asked[0]["round"] + 1)["devices"]
    )
    figure("killed device: round in flight", f"completed with 2 of 3 in {lost['duration_s']:.0f} s")
    figure("killed device, base wiped: base sent again", f"round {asked[0]['round'] + 1}")
    figure("killed device: why", lost["missing_why"]["pi-3"])
    figure("killed device: seconds until it trains again", f"{returned_s:.0f}")
    figure("killed device: supervisor restarts", restarts)
    figure("killed device: rounds lost", 0)

    # the SuperLink SIGKILLed and restarted: `fleet run` says how to resume
    before = file_hashes(run)
    completed = RunFolder(run).completed_rounds()
    kill_group(processes.started["superlink"])
    killed_at = time.monotonic()
    time.sleep(2)
    start_superlink(processes, fleet, "superlink-2")
    assert follower.wait(timeout=TIMEOUT_S + 60) == 2
    figure(
        "SuperLink restart: seconds until `fleet run` exits 2",
        f"{time.monotonic() - killed_at:.0f}",
    )
    said = processes.log("fleet-run")
    assert f"fleet run --resume {run}" in said, said[-2000:]
    # the ServerApp the dead SuperLink started is gone before the hint is printed
    assert RunFolder(run).holder() is None, said[-2000:]
    in_flight = max(completed) + 1
    finished = RunFolder(run).completed_rounds()
    resume = runner.invoke(app, ["run", "--resume", str(run), "--rounds", str(max(finished) + 1)])
    assert resume.exit_code == 0, resume.output + processes.log("superlink-2")[-3000:]
    after = file_hashes(run)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert changed == []
    assert not (run / "failure.txt").exists()
    assert RunFolder(run).completed_rounds() == [*finished, max(finished) + 1]
    figure("SuperLink restart: rounds lost", f"{len(set(range(1, in_flight + 1)) - set(finished))}")
    figure("SuperLink restart: files changed in completed rounds", len(changed))

    # round 1's push failed (the Pushgateway was down; round 1 is in the run folder); the later
    # rounds' pushes reached Prometheus, each replacing the fleet's one group
    query = 'skip2fleet_round_number > 1 and on (job) skip2fleet_run_info{run="run-a"}'
    assert wait_for(lambda: prometheus_query(prometheus, query), 60, "a later round in Prometheus")


@pytest.fixture(scope="module")
def poisoned_run(deployment) -> RunFolder:
    """Two rounds in which pi-2 and pi-3 send poisoned replies (see client/faulty.py)."""
    fleet, _, processes, root, _ = deployment
    if not any(p.poll() is None for n, p in processes.started.items() if n.startswith("pi-3")):
        start_supernode(processes, fleet, root, "pi-3", "pi-3-poisoned")
    faults = {"pi-2": {"1": "scale1000", "2": "shape"}, "pi-3": {"1": "nan"}}
    for device, rounds in faults.items():
        (root / "devices" / device).mkdir(parents=True, exist_ok=True)
        (root / "devices" / device / "inject-fault.json").write_text(json.dumps(rounds))
    # Every round's adapters are sent (accept: always): after run-a the devices' active models are
    # better than one round from a fresh start, and a device that keeps its model sends nothing.
    # No clip: the test recomputes the merge from the received adapters alone (the clip needs
    # each device's start; tests/test_aggregation.py and the Byzantine bench cover it).
    fleet = dataclasses.replace(
        fleet,
        federation=dataclasses.replace(fleet.federation, rounds=2, clip=None),
        training=dataclasses.replace(fleet.training, accept=Accept.ALWAYS),
    )
    wait_for(lambda: len(online(fleet)) == 3, 120, "three devices online")
    folder = RunFolder.create(root / "run-b", as_yaml_dict(fleet), fleet_base(fleet))
    try:
        follow(fleet, folder, start_run(fleet, folder, FAULTY_CLIENTAPP))
    finally:
        for device in faults:
            (root / "devices" / device / "inject-fault.json").unlink()
    return folder


def test_poisoned_replies_are_refused_and_left_out_of_the_aggregate(poisoned_run):
    folder = poisoned_run
    training = folder.config().training
    method, spec, rank = (
        get_method(training.method),
        base_model.spec_of(folder.base()),
        training.rank,
    )
    first, second = folder.round_result(1), folder.round_result(2)
    assert first["refused"]["pi-3"] == "adapters hold NaN or Inf"
    assert "x the round's median" in first["refused"]["pi-2"], first["refused"]
    assert "expected float32" in second["refused"]["pi-2"], second["refused"]
    assert sorted(first["devices"]) == ["pi-1"] and sorted(second["devices"]) == ["pi-1", "pi-3"]
    for number, result in ((1, first), (2, second)):
        received = folder.received(number)
        assert set(received) <= set(result["devices"])  # a kept model sends no adapters
        updates = [
            Update(n, v, result["devices"][n]["samples"], rank)
            for n, v in sorted(received.items(), key=lambda item: DEVICES.index(item[0]))
        ]
        expected = STRATEGIES["fedavg"](updates, method, spec).per_device
        outgoing = folder.outgoing(number)  # refused devices start where they started
        assert sorted(outgoing) == DEVICES and set(expected) <= set(outgoing)
        for device, theta in expected.items():
            np.testing.assert_array_equal(outgoing[device], theta)
    figure(
        "poisoned replies refused",
        {**first["refused"], **{f"{k} (round 2)": v for k, v in second["refused"].items()}},
    )


@pytest.mark.parametrize(
    "damaged",
    ["rounds/001/round.json", "rounds/002/received.npz", "rounds/001/outgoing.npz"],
)
def test_a_corrupt_round_file_is_named_and_nothing_is_submitted(
    poisoned_run, deployment, tmp_path, damaged
):
    fleet = deployment[0]
    copy = tmp_path / "run"
    shutil.copytree(poisoned_run.path, copy)
    data = (copy / damaged).read_bytes()
    (copy / damaged).write_bytes(data[: len(data) // 2])
    runs_before = len(flwr(fleet, "ls", CONNECTION)["runs"])
    result = runner.invoke(app, ["run", "--resume", str(copy), "--rounds", "3"])
    assert result.exit_code == 2
    assert str(copy / damaged) in result.output and "corrupt" in result.output, result.output
    assert len(flwr(fleet, "ls", CONNECTION)["runs"]) == runs_before


def test_a_full_disk_names_the_file_and_keeps_the_completed_rounds(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here (CI runs as root): {mounted.stderr.decode().strip()}"
        )
    try:
        base = base_model.init_model(mlp(8, 3, hidden=8), np.random.default_rng(0))
        folder = RunFolder.create(disk / "run", {"devices": []}, base)
        arrays = {d: np.ones(16_000, np.float32) for d in DEVICES}  # 64 kB each
        folder.save_round(1, {"round": 1}, arrays, arrays)
        filler = disk / "filler"  # fill the disk, then free 100 kB
        with filler.open("wb", buffering=0) as handle, pytest.raises(OSError):
            while True:
                handle.write(b"\0" * 4096)
        os.truncate(filler, filler.stat().st_size - 100_000)
        with pytest.raises(Exception) as failed:
            folder.save_round(2, {"round": 2}, arrays, arrays)
        message = str(failed.value)
        assert "No space left on device" in message and str(folder.path / "rounds") in message
        assert list((folder.path / "rounds").iterdir()) == [folder.path / "rounds" / "001"]
        folder.verify()  # round 1 intact
        folder.record_failure(message)
        assert folder.failure() == message
        figure("full disk", message)
    finally:
        subprocess.run(["umount", disk], check=True)


def test_an_oversized_reply_is_refused_before_its_arrays_are_built():
    """A reply of 100 MB of adapters: its arrays are checked on their metadata, so the ServerApp
    holds the reply Flower received and nothing more (the old check built the array first)."""
    base = base_model.init_model(mlp(8, 3, hidden=8), np.random.default_rng(0))
    method, spec = get_method("skip2-lora"), base_model.spec_of(base)
    size = layout(method, spec, 4).size
    huge = np.ones(25_000_000, np.float32)
    content = RecordDict(
        {
            Part.ADAPTERS: ArrayRecord({THETA: Array(huge)}),
            Part.DEVICE: ConfigRecord({DEVICE_NAME: "pi-1"}),
        }
    )
    content[Part.FIGURES] = figures_record(Figures(*([1] * len(dataclasses.fields(Figures)))))
    del huge
    metadata = Metadata(1, "reply", 7, 1, "plan", "", time.time(), 60.0, MessageType.TRAIN)
    reply = make_message(metadata, content)
    answers = Exchange(replies={7: reply}, seconds={7: 1.0})
    tracemalloc.start()
    try:
        content[Part.ADAPTERS][THETA].numpy()  # what refusing by shape used to cost
        before = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        ledger = validate(answers, Roster({"pi-1": 4}, {"pi-1": size}, {7: "pi-1"}, trusted=True))
        after = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ledger.accepted == {} and f"expected float32 ({size},)" in ledger.refused["pi-1"]
    assert after < 1_000_000 < 90_000_000 < before
    figure(
        "oversized reply (100 MB): ServerApp memory beyond the received reply",
        f"{before / 1e6:.0f} MB before, {after / 1e6:.1f} MB after",
    )


def test_fleet_run_stops_the_serverapp_that_outlived_its_superlink_and_nothing_else(tmp_path):
    """What makes the printed resume command work the first time: the ServerApp a dead SuperLink
    started still holds run.lock; `fleet run` stops it by the pid in run.lock, and only a
    process that is a `flwr-serverapp` (a pid reused by anything else is left alone)."""
    base = base_model.init_model(mlp(8, 3, hidden=8), np.random.default_rng(0))
    folder = RunFolder.create(tmp_path / "run", {"devices": []}, base)
    holder = (
        "import sys, time\n"
        "from skip2fleet.server.federation.runs import RunFolder\n"
        "with RunFolder(sys.argv[1]).lock():\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(300)\n"
    )
    for name, stopped in (("flwr-serverapp", True), ("something-else", False)):
        script = tmp_path / name
        script.write_text(holder)
        process = subprocess.Popen(
            [sys.executable, str(script), str(folder.path)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert process.stdout.readline() == "locked\n"
            said = stop_orphaned_serverapp(folder)
            assert (folder.holder() is None) == stopped, said
            assert (process.poll() is not None) == stopped, said
            assert ("was stopped" in said) == stopped and str(process.pid) in said, said
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
