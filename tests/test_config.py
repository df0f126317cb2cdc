"""fleet.yaml: the example loads; every kind of mistake names the key and the problem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.shared.config import TRAINING_LIMITS, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def example() -> dict:
    return yaml.safe_load((ROOT / "fleet.yaml").read_text())


def test_the_example_fleet_loads():
    config = load_config(ROOT / "fleet.yaml")
    assert config.task.dataset == "generated"
    assert [d.name for d in config.devices] == ["pi-1", "pi-2", "pi-3"]
    assert config.devices[0].data.partition == "0"
    assert config.rank_of(config.devices[2]) == 4


def test_a_fleet_says_what_it_trains_on():
    config = example()
    assert parse_config(config).data_label == "generated"
    for device in config["devices"]:
        device["data"] = {"path": f"/var/lib/skip2fleet/{device['name']}"}
    assert parse_config(config).data_label == "own samples (each device's folder)"  # no source
    config["devices"][0]["data"] = {"partition": "0"}
    assert parse_config(config).data_label == "generated"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["training"].update(learning_rate=0.1), "training.learning_rate: unknown key"),
        (lambda c: c["federation"].update(rounds="three"), "federation.rounds: expected int"),
        (lambda c: c["federation"].update(rounds=0), "federation.rounds: must be at least 1"),
        (lambda c: c["devices"][2].update(name="pi-1"), "devices[2].name: duplicate device name"),
        (lambda c: c["task"].update(data_dir="/no/such/folder"), "task.data_dir: data folder"),
        (lambda c: c["federation"].update(aggregation="mean"), "federation.aggregation: must be"),
        (lambda c: c["training"].update(model="resnet"), "training.model: unknown model"),
        (lambda c: c["devices"][0].pop("name"), "devices[0].name: required"),
        (
            lambda c: (
                c["devices"][1].update(rank=8) or c["federation"].update(aggregation="fedavg")
            ),
            "needs one rank on every device",
        ),
        (lambda c: c["federation"].update(min_devices=5), "federation.min_devices: is 5"),
        (lambda c: c["training"].update(method="lora-first"), "training.method: unknown method"),
        (lambda c: c["task"].update(alert_classes=["a|b"]), "task.alert_classes: 'a|b' is not"),
        (lambda c: c["task"].update(alert_rate=0), "task.alert_rate: must be above 0"),
        (lambda c: c["serve"].update(log_max_mb=0), "serve.log_max_mb: must be between"),
        (lambda c: c["serve"].update(port=1), "serve.port: unknown key"),
        (lambda c: c["federation"].update(weighting="votes"), "federation.weighting: must be"),
        (lambda c: c["federation"].update(max_weight=0.9), "federation.max_weight: must be at"),
        (lambda c: c["federation"].update(trim=0.5), "federation.trim: must be at least 0"),
        (lambda c: c["federation"].update(clip=0.5), "federation.clip: must be at least 1"),
        (lambda c: c["federation"].update(schedule="daily; rm -rf /"), "federation.schedule: must"),
        (lambda c: c["federation"].update(schedule=""), "federation.schedule: must be a systemd"),
    ],
)
def test_mistakes_are_named(change, message):
    config = example()
    change(config)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(config)


def test_malformed_yaml_and_missing_file(tmp_path):
    (tmp_path / "fleet.yaml").write_text("devices: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "fleet.yaml")
    with pytest.raises(ConfigError, match="no such fleet file"):
        load_config(tmp_path / "other.yaml")


def test_simulate_with_a_bad_fleet_exits_2_and_starts_nothing(tmp_path):
    config = example()
    config["federation"]["rounds"] = 0
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["simulate", "--config", str(tmp_path / "fleet.yaml"), "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "federation.rounds: must be at least 1" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "offset"),
    [(b"\x89PNG\r\n\x1a\n", 0), ("# caf\u00e9 in Latin-1\ndevices: []\n".encode("latin-1"), 5)],
)
def test_a_fleet_file_that_is_not_utf8_is_one_line_naming_the_offset(tmp_path, content, offset):
    path = tmp_path / "fleet.yaml"
    path.write_bytes(content)
    result = CliRunner().invoke(app, ["simulate", "--config", str(path)])
    assert result.exit_code == 2
    (message,) = result.output.splitlines()  # one line, whatever the terminal's width
    assert message.startswith(f"error: {path}: not UTF-8 text (byte 0x"), result.output
    assert message.endswith(f"at offset {offset})") and "Traceback" not in message


@pytest.mark.parametrize(("make", "problem"), [("empty", "empty"), ("folder", "is a folder")])
def test_an_empty_or_folder_fleet_yaml_here_is_an_error_not_the_example(
    tmp_path, monkeypatch, make, problem
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fleet.yaml").mkdir() if make == "folder" else (tmp_path / "fleet.yaml").touch()
    result = CliRunner().invoke(app, ["simulate", "--rounds", "1"])
    assert result.exit_code == 2 and problem in result.output, result.output
    assert not (tmp_path / "runs").exists()


def test_without_a_fleet_yaml_simulate_says_it_runs_the_built_in_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pythonpath = os.environ.get("PYTHONPATH")
    result = CliRunner().invoke(app, ["simulate", "--rounds", "1", "--devices", "2"])
    assert result.exit_code == 0, result.output
    assert "no ./fleet.yaml: running the built-in example fleet" in result.output
    assert os.environ.get("PYTHONPATH") == pythonpath  # Ray's rewrite is undone


def test_command_line_values_get_fleet_yaml_bounds():
    limits = dict(TRAINING_LIMITS)
    config = example()
    config["training"]["rank"] = limits["rank"][1] + 1
    with pytest.raises(ConfigError, match=r"training\.rank: must be between 1 and 256"):
        parse_config(config)
    result = CliRunner().invoke(app, ["bench", "timing", "--rank", str(limits["rank"][1] + 1)])
    assert result.exit_code == 2 and "--rank" in result.output


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("name", "../../evil"),
        ("name", "Pi 1"),
        ("host", "pi-1.local; rm -rf /"),
        ("host", "pi 1"),
        ("ssh_user", "pi$(id)"),
        ("install_dir", "/opt/$(touch /tmp/pwned)"),
        ("install_dir", "/opt/../etc"),
        ("install_dir", "opt/skip2fleet"),
        ("python", "python3"),
    ],
)
def test_values_that_reach_a_shell_or_a_path_are_checked(tmp_path, key, value):
    config = example()
    config["devices"][1][key] = value
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(config))
    for command in (["simulate"], ["deploy", "--check"], ["certs"]):
        result = CliRunner().invoke(app, [*command, "--config", str(path)])
        assert result.exit_code == 2, result.output
        assert f"devices[1].{key}: {value!r} is not" in result.output, result.output
    assert list(tmp_path.iterdir()) == [path]  # nothing written, nothing started
