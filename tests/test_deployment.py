"""A real Flower deployment on loopback: SuperLink with TLS and node authentication, three
SuperNodes, `fleet run` for two rounds; an unregistered node is refused. Every process is started
in its own process group and stopped by it (Flower's services start children), also on failure."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from client.supernode import supernode_command
from server.certs import ensure_credentials
from server.cli import app
from server.run import credentials_for
from server.superlink import flower_env, flwr, register_nodes, superlink_command, write_connection
from shared.config import load_config
from shared.errors import FleetError

DEVICES = ["pi-1", "pi-2", "pi-3"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Processes a test started, each in its own group, stopped by group."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("w")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for process in self.started.values():
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 15
        for process in self.started.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for process in self.started.values():  # children of a group leader that already left
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def loopback_fleet(tmp_path):
    port = free_port()
    config = {
        "coordinator": {"address": "127.0.0.1", "port": port,
                        "state_dir": str(tmp_path / "state"), "tls": True},
        "training": {"epochs": 50, "pretrain_epochs": 10},
        "federation": {"rounds": 2, "min_devices": 3, "round_timeout_s": 60},
        "devices": [{"name": n, "data": {"partition": i}} for i, n in enumerate(DEVICES)],
    }  # fmt: skip
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(config))
    fleet = load_config(path)
    creds = credentials_for(fleet)
    processes = Processes(tmp_path)
    env = flower_env(fleet)
    try:
        processes.start("superlink", superlink_command(fleet, creds, host="127.0.0.1"), env)
        write_connection(fleet, creds)
        deadline = time.monotonic() + 60
        while True:  # the Control API answers once the SuperLink is up
            try:
                register_nodes(fleet, creds, DEVICES)
                break
            except FleetError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        for device in DEVICES:
            command = supernode_command(
                f"127.0.0.1:{port}", device, tmp_path / device, free_port(),
                creds.ca_cert, creds.node_key(device),
            )  # fmt: skip
            processes.start(device, command, env)
        yield fleet, path, processes
    finally:
        processes.stop_all()


def test_two_rounds_over_tls_with_node_authentication(loopback_fleet, tmp_path):
    _, path, processes = loopback_fleet
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--config", str(path), "--out", str(run)])
    assert result.exit_code == 0, result.output + processes.log("superlink")[-3000:]
    rounds = [json.loads((run / "rounds" / f"{n:03d}" / "round.json").read_text()) for n in (1, 2)]
    for number, outcome in enumerate(rounds, 1):
        assert sorted(outcome["devices"]) == DEVICES, f"round {number}: {outcome}"
        assert outcome["refused"] == {} and outcome["missing"] == []
    for device in rounds[-1]["devices"].values():
        assert device["acc_after"] > device["acc_before"]
    full = min(rounds[0]["downlink_bytes"].values())  # round 1 carries the base model
    assert max(rounds[1]["downlink_bytes"].values()) < full / 20  # then only the plan
    # each device kept the base and its cache on its own disk
    for device in DEVICES:
        assert len(list((tmp_path / device / "base").glob("*.npz"))) == 1
        assert len(list((tmp_path / device / "cache").glob("*.npy"))) == 1


def test_an_unregistered_node_is_refused(loopback_fleet, tmp_path):
    fleet, _, processes = loopback_fleet
    creds = ensure_credentials(tmp_path / "intruder-keys", ["127.0.0.1"], ["intruder"])
    command = supernode_command(
        f"127.0.0.1:{fleet.coordinator.port}", "intruder", tmp_path / "intruder", free_port(),
        credentials_for(fleet).ca_cert, creds.node_key("intruder"),
    )  # fmt: skip
    intruder = processes.start("intruder", command, flower_env(fleet))
    assert intruder.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in processes.log("intruder")
    listed = flwr(fleet, "supernode", "list", "fleet")["nodes"]
    assert len(listed) == len(DEVICES)
