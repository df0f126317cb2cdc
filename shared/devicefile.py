"""A device's own configuration: what one device needs of the fleet, and nothing else.

The coordinator writes it from fleet.yaml (`fleet deploy`, the loopback deployment); the device's
agent reads it. It holds only the device's own paths and ports, and reading it checks nothing
against any filesystem: the coordinator's folders (its `task.data_dir`, its state folder) do not
exist on a device. Standard library only: the agent imports this, and it must stay small in memory
(no NumPy, no Flower, no YAML).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from skip2fleet.shared.errors import FleetError

DEVICE_FILE = "device.json"  # in the device's etc/ folder
# In its state folder, written by the ClientApp, read by the agent (and `fleet predict`):
LAST_FIGURES = "last-finetune.json"  # the last fine-tune's figures
SERVE_SNAPSHOT = "serve-metrics.json"  # what `fleet serve` did, for the agent
ACTIVE = "active.json"  # which base and adapters version predicts
# The JSON values each field's annotation accepts (annotations are strings here).
KINDS = {"str": str, "int": int, "float": (int, float), "str | None": (str, type(None))}


@dataclass(frozen=True)
class DeviceSettings:
    """One device, as its own processes see it."""

    name: str
    state_dir: str  # the ClientApp's state folder (base, cache, adapters, last figures)
    data_dir: str | None  # its built-in data sets' folder, on the device; None: generated data
    samples: str | None  # its own samples' folder (devices[].data.path), on the device
    probe: str  # which power probe the agent samples (see client/telemetry/probes.py)
    idle_watts: float
    full_watts: float
    agent_address: str  # where the agent serves its metrics
    agent_port: int
    supernode_port: int  # the SuperNode's ClientAppIo port, which the SuperExec dials
    coordinator: str | None = None  # the front door, host:port: clock check and watchdog
    ca_cert: str | None = None  # the fleet's CA certificate, on the device (TLS to the door)

    def text(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> DeviceSettings:
        """The settings in `path`; a problem is one FleetError naming the file and the key."""
        try:
            raw = json.loads(Path(path).read_text())
        except OSError as exc:
            raise FleetError(f"{path}: cannot read the device file ({exc.strerror})") from None
        except ValueError as exc:
            raise FleetError(f"{path}: not a device file ({exc})") from None
        if not isinstance(raw, dict):
            raise FleetError(f"{path}: not a device file (expected a JSON object)")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        for key in sorted(set(fields) ^ set(raw)):
            problem = "unknown key" if key in raw else "missing"
            raise FleetError(f"{path}: {key}: {problem}")
        for key, value in raw.items():
            if not isinstance(value, KINDS[fields[key]]) or isinstance(value, bool):
                raise FleetError(f"{path}: {key}: unexpected value {value!r}")
        return cls(**raw)
