"""fleet.yaml: the example loads; every kind of mistake names the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from skip2fleet.server.cli import app
from skip2fleet.shared.config import ConfigError, load_config, parse_config
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def example() -> dict:
    return yaml.safe_load((ROOT / "fleet.yaml").read_text())


def test_the_example_fleet_loads():
    config = load_config(ROOT / "fleet.yaml")
    assert config.task.dataset == "generated"
    assert [d.name for d in config.devices] == ["pi-1", "pi-2", "pi-3"]
    assert config.devices[0].data.partition == "0"
    assert config.rank_of(config.devices[2]) == 4


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
