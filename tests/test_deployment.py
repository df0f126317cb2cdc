"""A real Flower deployment on loopback: SuperLink with TLS and node authentication, three
SuperNodes, `fleet run` for two rounds; an unregistered node is refused (at the front door).
`loopback_deployment` starts every process in its own group and stops it by group, also when a
test fails."""

from __future__ import annotations

import itertools
import json

import pytest
import yaml
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.server.federation.run import credentials_for
from skip2fleet.server.operations.certs import ensure_credentials
from skip2fleet.server.operations.frontdoor import run_folder
from skip2fleet.server.operations.loopback import (
    FIXED_PORTS_FROM,
    ephemeral_ports,
    free_port,
    loopback_deployment,
    wait_for,
)
from skip2fleet.server.operations.superlink import flower_env, flwr
from skip2fleet.shared.config import load_config
from skip2fleet.shared.services import supernode_command

DEVICES = ["pi-1", "pi-2", "pi-3"]


@pytest.fixture
def loopback_fleet(tmp_path):
    config = {
        "coordinator": {
            "address": "127.0.0.1",
            "port": free_port(),
            "superlink_port": free_port(),
            "state_dir": str(tmp_path / "state"),
            "tls": True,
        },
        "training": {"epochs": 50, "pretrain_epochs": 10},
        "federation": {"rounds": 2, "min_devices": 3, "round_timeout_s": 60},
        "devices": [{"name": n, "data": {"partition": i}} for i, n in enumerate(DEVICES)],
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(config))
    fleet = load_config(path)
    with loopback_deployment(fleet, tmp_path) as processes:
        yield fleet, path, processes


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
    for device in DEVICES:  # each device kept the base and its cache on its own disk
        assert len(list((tmp_path / "devices" / device / "base").glob("*.npz"))) == 1
        assert len(list((tmp_path / "devices" / device / "cache").glob("*-f32.npz"))) == 1


def test_an_unregistered_node_is_refused(loopback_fleet, tmp_path):
    fleet, _, processes = loopback_fleet
    keys = ensure_credentials(tmp_path / "intruder-keys", ["127.0.0.1"], ["intruder"])
    command = supernode_command(
        f"127.0.0.1:{fleet.coordinator.port}",
        "intruder",
        tmp_path / "intruder",
        free_port(),
        credentials_for(fleet).ca_cert,
        keys.node_key("intruder"),
    )
    processes.start("intruder", command, flower_env(fleet))
    # refused at the front door, whose allowlist holds only the fleet's registered keys
    refused = '"POST /v1/fleet/activate-node" 403'
    door_log = run_folder(fleet) / "nginx-access.log"
    wait_for(lambda: refused in door_log.read_text(), 120, "the door's refusal")
    wait_for(lambda: "'403 Forbidden' for url" in processes.log("intruder"), 30, "the 403")
    assert len(flwr(fleet, "supernode", "list", "fleet")["nodes"]) == len(DEVICES)


def test_loopback_ports_come_in_turn_from_below_the_ephemeral_range(tmp_path):
    """A port the kernel may hand to any outgoing connection (or to a client connecting to its
    own port) is never chosen for a service, and one run never gets the same port twice."""
    ports = [free_port() for _ in range(50)]
    low, _ = ephemeral_ports()
    assert all(FIXED_PORTS_FROM <= port < low for port in ports)
    steps = [(later - port) % (low - FIXED_PORTS_FROM) for port, later in itertools.pairwise(ports)]
    assert all(1 <= step <= 10 for step in steps), steps  # in turn, skipping only ports in use
    table = tmp_path / "ip_local_port_range"
    table.write_text("40000\t60999\n")
    assert ephemeral_ports(table) == (40000, 60999)
    table.write_text("garbled")
    assert ephemeral_ports(table) == (32768, 60999)
