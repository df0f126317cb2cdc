"""A run folder: everything a federated run leaves behind, written as each round completes.

    fleet.yaml            the fleet as it was when the run started
    nodes.json            device name -> Flower node id, as the coordinator registered the keys
                          (deployments only: the ServerApp trusts a reply's node id, not its words)
    base.npz              the base model every device fine-tunes
    rounds/NNN/round.json the round's figures: per device, refused replies, missing devices
    rounds/NNN/received/  each device's packed adapters as it sent them
    rounds/NNN/outgoing/  what each device starts the next round from (when the fleet aggregates)

A round's folder appears whole (written aside, then renamed), so the last complete round is the
highest-numbered folder, and `--resume` continues after it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import yaml

from skip2fleet.shared import model as base_model
from skip2fleet.shared.config import FleetConfig, load_config, parse_config
from skip2fleet.shared.errors import FleetError


class RunFolder:
    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser().resolve()

    @classmethod
    def create(cls, path: Path, config_yaml: dict, base: base_model.Model) -> RunFolder:
        folder = cls(path)
        if (folder.path / "fleet.yaml").exists():
            raise FleetError(f"{folder.path}: a run folder already exists here; use --resume")
        folder.path.mkdir(parents=True, exist_ok=True)
        base_model.save(base, folder.path / "base.npz")
        (folder.path / "fleet.yaml").write_text(yaml.safe_dump(config_yaml, sort_keys=False))
        return folder

    def config(self) -> FleetConfig:
        path = self.path / "fleet.yaml"
        if not path.is_file():
            raise FleetError(f"{self.path}: not a run folder (no fleet.yaml)")
        return load_config(path)

    def extend(self, rounds: int | None) -> RunFolder:
        """Set the run's total rounds (to continue it further); None keeps them."""
        config = self.config()
        if rounds is not None:
            data = yaml.safe_load((self.path / "fleet.yaml").read_text())
            data["federation"]["rounds"] = rounds
            parse_config(data, str(self.path / "fleet.yaml"))
            (self.path / "fleet.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        elif self.completed_rounds()[-1:] == [config.federation.rounds]:
            raise FleetError(
                f"{self.path}: all {config.federation.rounds} rounds are done; "
                "pass --rounds to go further"
            )
        return self

    def record_failure(self, reason: str) -> None:
        """Why the run stopped early, for `fleet run` to report (the ServerApp's log is remote)."""
        (self.path / "failure.txt").write_text(reason + "\n")

    def failure(self) -> str | None:
        path = self.path / "failure.txt"
        return path.read_text().strip() if path.is_file() else None

    def save_node_registry(self, registry: dict[str, int]) -> None:
        (self.path / "nodes.json").write_text(json.dumps(registry, indent=2) + "\n")

    def node_registry(self) -> dict[int, str]:
        """Node id -> device name, or empty in a simulation (no keys, nothing registered)."""
        path = self.path / "nodes.json"
        registry = json.loads(path.read_text()) if path.is_file() else {}
        return {int(node): name for name, node in registry.items()}

    def base(self) -> base_model.Model:
        return base_model.load(self.path / "base.npz")

    def completed_rounds(self) -> list[int]:
        rounds = self.path / "rounds"
        return (
            sorted(int(p.name) for p in rounds.iterdir() if p.name.isdigit())
            if rounds.is_dir()
            else []
        )

    def round_result(self, number: int) -> dict:
        return json.loads((self.path / "rounds" / f"{number:03d}" / "round.json").read_text())

    def outgoing(self, number: int) -> dict[str, np.ndarray]:
        """What round `number` left for each device to start the next round from."""
        folder = self.path / "rounds" / f"{number:03d}" / "outgoing"
        if not folder.is_dir():
            return {}
        return {p.stem: np.load(p) for p in sorted(folder.glob("*.npy"))}

    def save_round(
        self,
        number: int,
        result: dict,
        received: dict[str, np.ndarray],
        outgoing: dict[str, np.ndarray],
    ) -> None:
        rounds = self.path / "rounds"
        rounds.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=rounds, prefix=f".{number:03d}-"))
        for kind, arrays in (("received", received), ("outgoing", outgoing)):
            (staging / kind).mkdir()
            for device, array in arrays.items():
                np.save(staging / kind / f"{device}.npy", array)
        (staging / "round.json").write_text(json.dumps(result, indent=2) + "\n")
        final = rounds / f"{number:03d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
