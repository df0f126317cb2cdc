"""`fleet.yaml`: one file that describes the fleet, validated on load.

Every section is a frozen dataclass; the loader walks the YAML against the dataclass fields, so an
unknown key, a wrong type or a bad value is reported with its path (`devices[1].rank: ...`) before
anything starts.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from skip2fleet.shared.cache import Codec
from skip2fleet.shared.datasets import DEFAULT_SOURCE_ROOM, DEFAULT_SUBJECTS, SOURCE_ROOMS, TASKS
from skip2fleet.shared.datasets.samples import (
    DEFAULT_HOLDOUT,
    DEFAULT_LABEL_COLUMN,
    DEFAULT_MAX_SAMPLES,
)
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.methods import METHODS
from skip2fleet.shared.protocol import Accept
from skip2fleet.shared.spec import MODELS

AGGREGATIONS = ("none", "fedavg", "svd", "median", "trimmed-mean")
WEIGHTINGS = ("samples", "equal")
PROBES = ("auto", "hwmon", "pi5-pmic", "rapl", "cpu-model", "none")
# Bounds of the integer training settings, inclusive; fleet.yaml and the command line share them.
TRAINING_LIMITS = {
    "rank": (1, 256),
    "epochs": (1, 100_000),
    "batch_size": (1, 65_536),
    "pretrain_epochs": (1, 100_000),
    "max_samples": (1, 100_000_000),
}
# Values that end up in shells, paths and templates: only these shapes get through.
DEVICE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# What a calendar expression is made of (systemd reads it fully, at deploy and at each elapse):
# one printable line, no quotes or shell characters, since it goes into a unit file.
SCHEDULE = re.compile(r"[A-Za-z0-9 *,.:/~+-]{1,120}")
HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")
MAX_LR = 100.0  # the learning rate lies in (0, MAX_LR]; beyond it, surely a typo


class ConfigError(FleetError):
    """fleet.yaml is malformed; the message names the file, the key and the problem."""


@dataclass(frozen=True)
class Coordinator:
    address: str = "127.0.0.1"  # where the devices reach the front door (nginx)
    port: int = 8000  # the front door's HTTPS port: the Fleet API only
    superlink_port: int = 9093  # the SuperLink's own port, on the coordinator's loopback only
    max_request_bytes: int = 1 << 20  # the largest request a device may send (its reply)
    state_dir: str = "~/.skip2fleet"  # certificates, node keys, run folders
    tls: bool = True
    pushgateway: str | None = None  # host:port; each round's figures are pushed there
    prometheus_port: int = 9090


@dataclass(frozen=True)
class TaskConfig:
    dataset: str = "generated"
    data_dir: str | None = None
    source_room: str = DEFAULT_SOURCE_ROOM
    subjects: tuple[int, ...] = DEFAULT_SUBJECTS
    source: str | None = None  # the coordinator's own samples to pretrain on (.npz/.csv folder)
    label_column: str = DEFAULT_LABEL_COLUMN  # of CSV files
    holdout: float = DEFAULT_HOLDOUT  # per class, never trained on: "accuracy before/after"
    alert_classes: tuple[str, ...] = ()  # classes whose predictions by `fleet serve` are alarms
    alert_rate: float = 0.01  # alarm predictions a second (a 5-minute mean) that fire AlarmClass


@dataclass(frozen=True)
class Training:
    model: str = "mlp"  # a built-in model of shared.spec.MODELS
    method: str = "skip2-lora"
    rank: int = 4
    epochs: int = 100
    lr: float = 0.01
    batch_size: int = 20
    seed: int = 0
    pretrain_epochs: int = 30
    cache: Codec = Codec.F32  # Skip2-LoRA's cache codec: f32 | int8 | int4 (shared.cache)
    accept: Accept = Accept.IF_BETTER  # new adapters become active only when not worse; or always
    max_samples: int = DEFAULT_MAX_SAMPLES  # a device trains on at most its newest this many


@dataclass(frozen=True)
class Serve:
    """`fleet serve` on every device, installed and started by `fleet deploy`."""

    enabled: bool = True
    keep: bool = True  # answered spool files to spool/done (False: deleted)
    log_max_mb: float = 10.0  # the prediction log and its one rotated copy, together


@dataclass(frozen=True)
class Federation:
    rounds: int = 3
    aggregation: str = "none"
    min_devices: int = 1
    round_timeout_s: float = 120.0
    # a reply whose change in any block exceeds this many times the round's median is refused
    max_update_ratio: float = 10.0
    weighting: str = "samples"  # fedavg and svd weigh a reply by its samples, or all equally
    # no reply weighs more than this many times the equal share (1 / replies merged)
    max_weight: float = 2.0
    trim: float = 0.2  # trimmed-mean: the fraction cut from each end of every coordinate
    # each change's norm clipped to this many times the round's median before merging: an
    # in-bounds but bold update (up to max_update_ratio x) then moves the mean no more than an
    # honest one twice as large (None: off)
    clip: float | None = 2.0
    # systemd calendar syntax (OnCalendar=, e.g. "daily" or "*:0/30"): `fleet deploy` makes the
    # coordinator run the rounds then, by itself (server/operations/schedule.py); None: only by hand
    schedule: str | None = None


@dataclass(frozen=True)
class DeviceData:
    partition: str = "0"  # generated: a noisy room's seed; har: a subject; fan: damage1|damage2
    data_dir: str | None = None  # on the device; default: the task's data_dir
    path: str | None = None  # the device's own samples (.npz/.csv folder), instead of a partition


@dataclass(frozen=True)
class Device:
    name: str
    host: str = "127.0.0.1"
    ssh_user: str = "pi"
    data: DeviceData = field(default_factory=DeviceData)
    probe: str = "auto"
    idle_watts: float = 1.0  # for the cpu-model probe: the board idle and at full load
    full_watts: float = 3.0
    agent_port: int = 9101  # where `fleet agent` serves its metrics
    install_dir: str = "/opt/skip2fleet"  # venv, configuration, keys and state on the device
    python: str = "/usr/bin/python3"  # the device's Python (3.11 or newer, with venv)
    rank: int | None = None  # overrides training.rank for this device


@dataclass(frozen=True)
class FleetConfig:
    coordinator: Coordinator = field(default_factory=Coordinator)
    task: TaskConfig = field(default_factory=TaskConfig)
    training: Training = field(default_factory=Training)
    federation: Federation = field(default_factory=Federation)
    devices: tuple[Device, ...] = ()
    serve: Serve = field(default_factory=Serve)
    source: str = "fleet.yaml"

    def rank_of(self, device: Device) -> int:
        return device.rank if device.rank is not None else self.training.rank

    @property
    def data_label(self) -> str:
        """What the fleet trains on, for reports: the source of its own samples, the devices'
        own folders (an imported base, no source), or the built-in task."""
        if self.task.source:
            return f"own samples ({self.task.source})"
        if self.devices and all(d.data.path for d in self.devices):
            return "own samples (each device's folder)"
        return self.task.dataset


def state_dir(config: FleetConfig) -> Path:
    """The coordinator's folder for certificates, node keys, run folders and generated files."""
    return Path(config.coordinator.state_dir).expanduser()


def load_config(path: Path) -> FleetConfig:
    """Read and check a fleet file; every problem is a `ConfigError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a fleet file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such fleet file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    if not text.strip():
        raise ConfigError(f"{path}: empty; see the example fleet.yaml in the checkout")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc)}") from None
    if isinstance(raw, dict) and raw.get("devices") == []:
        raise ConfigError(
            f"{path}: devices: empty; list the fleet's devices (to simulate some without a "
            "list, leave the key out and pass `fleet simulate --devices N`)"
        )
    return parse_config(raw, str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML syntax error as one line, with its line and column (PyYAML's own message names
    "<unicode string>" in place of the file and spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return f"{where}not valid YAML: {problem}" + (f" ({context})" if context else "")


def parse_config(raw: Any, source: str = "fleet.yaml") -> FleetConfig:
    """Build and check a FleetConfig from parsed YAML."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    config = _build(FleetConfig, {k: v for k, v in raw.items() if k != "source"}, source, "")
    config = dataclasses.replace(config, source=source)
    _check(config)
    return config


def _build(cls: type, raw: Any, source: str, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where or 'top level'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    # FleetConfig.source is where the file came from, not a key of it
    fields = {
        f.name: f
        for f in dataclasses.fields(cls)
        if not (cls is FleetConfig and f.name == "source")
    }
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: {_join(where, unknown[0])}: unknown key; expected one of "
            f"{', '.join(fields)}"
        )
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, source, _join(where, name))
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: {_join(where, missing[0])}: required")
    return cls(**values)


def _coerce(hint: Any, value: Any, source: str, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, source, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if value not in tuple(hint):
            raise ConfigError(f"{source}: {where}: must be one of {', '.join(map(str, hint))}")
        return hint(value)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, source, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # a partition may be written as a number
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {where}: expected {hint.__name__}, got {value!r}")
    return value


def _check(config: FleetConfig) -> None:
    src = config.source

    def fail(where: str, problem: str) -> typing.NoReturn:
        raise ConfigError(f"{src}: {where}: {problem}")

    if config.task.dataset not in TASKS:
        fail(
            "task.dataset",
            f"unknown dataset {config.task.dataset!r}; choose from {', '.join(TASKS)}",
        )
    if config.task.source_room not in SOURCE_ROOMS:
        fail("task.source_room", f"must be one of {', '.join(SOURCE_ROOMS)}")
    if config.task.data_dir is not None and not Path(config.task.data_dir).expanduser().is_dir():
        fail("task.data_dir", f"data folder {config.task.data_dir} does not exist")
    if not 0 < config.task.holdout < 1:
        fail("task.holdout", "must be above 0 and below 1")
    for name in config.task.alert_classes:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            fail("task.alert_classes", f"{name!r} is not a class name (letters, digits, _ and -)")
    if not 0.01 <= config.serve.log_max_mb <= 10_000:
        fail("serve.log_max_mb", "must be between 0.01 and 10000")
    if not config.task.alert_rate > 0:
        fail("task.alert_rate", "must be above 0 (alarm predictions a second)")
    if config.training.model not in MODELS:
        fail("training.model", f"unknown model; choose from {', '.join(MODELS)}")
    if config.training.method not in METHODS:
        fail("training.method", f"unknown method; choose from {', '.join(METHODS)}")
    for name, (low, high) in TRAINING_LIMITS.items():
        if not low <= getattr(config.training, name) <= high:
            fail(f"training.{name}", f"must be between {low} and {high}")
    if not 0 < config.training.lr <= MAX_LR:
        fail("training.lr", f"must be above 0 and at most {MAX_LR}")
    fed = config.federation
    if fed.rounds < 1:
        fail("federation.rounds", "must be at least 1")
    if fed.aggregation not in AGGREGATIONS:
        fail("federation.aggregation", f"must be one of {', '.join(AGGREGATIONS)}")
    if fed.min_devices < 1:
        fail("federation.min_devices", "must be at least 1")
    if not fed.round_timeout_s > 0:
        fail("federation.round_timeout_s", "must be positive")
    if not fed.max_update_ratio > 1:
        fail("federation.max_update_ratio", "must be above 1")
    if fed.weighting not in WEIGHTINGS:
        fail("federation.weighting", f"must be one of {', '.join(WEIGHTINGS)}")
    if not fed.max_weight >= 1:
        fail("federation.max_weight", "must be at least 1 (the equal share)")
    if not 0 <= fed.trim < 0.5:
        fail("federation.trim", "must be at least 0 and below 0.5")
    if fed.clip is not None and not fed.clip >= 1:
        fail("federation.clip", "must be at least 1 (times the round's median change)")
    if fed.schedule is not None and not SCHEDULE.fullmatch(fed.schedule):
        fail("federation.schedule", "must be a systemd calendar expression, e.g. daily or *:0/30")
    for key in ("port", "superlink_port", "prometheus_port"):
        if not 0 < getattr(config.coordinator, key) < 65536:
            fail(f"coordinator.{key}", "must be a TCP port, 1 to 65535")
    if config.coordinator.superlink_port == config.coordinator.port:
        fail("coordinator.superlink_port", "must differ from coordinator.port (the front door)")
    if not 1024 <= config.coordinator.max_request_bytes <= 1 << 30:
        fail("coordinator.max_request_bytes", "must be between 1024 and 1073741824")
    if not _is_host(config.coordinator.address):
        fail(
            "coordinator.address",
            f"{config.coordinator.address!r} is not a host name or IP address",
        )
    seen: set[str] = set()
    for i, device in enumerate(config.devices):
        checks = (
            ("name", DEVICE_NAME.fullmatch(device.name), "lower-case letters, digits and '-'"),
            ("host", _is_host(device.host), "a host name or IP address"),
            ("ssh_user", USER_NAME.fullmatch(device.ssh_user), "a user name"),
            (
                "install_dir",
                _is_safe_path(device.install_dir),
                "an absolute path of plain characters",
            ),
            ("python", _is_safe_path(device.python), "an absolute path of plain characters"),
        )
        for key, ok, shape in checks:
            if not ok:
                fail(f"devices[{i}].{key}", f"{getattr(device, key)!r} is not {shape}")
        if device.data.data_dir is not None and not _is_safe_path(device.data.data_dir):
            fail(
                f"devices[{i}].data.data_dir",
                f"{device.data.data_dir!r} is not an absolute path of plain characters",
            )
        if device.data.path is not None and not _is_safe_path(device.data.path):
            fail(
                f"devices[{i}].data.path",
                f"{device.data.path!r} is not an absolute path of plain characters",
            )
        if config.task.source is not None and device.data.path is None:
            fail(f"devices[{i}].data.path", "required with task.source (the device's own samples)")
        if device.name in seen:
            fail(f"devices[{i}].name", f"duplicate device name {device.name!r}")
        seen.add(device.name)
        if device.probe not in PROBES:
            fail(f"devices[{i}].probe", f"must be one of {', '.join(PROBES)}")
        low, high = TRAINING_LIMITS["rank"]
        if device.rank is not None and not low <= device.rank <= high:
            fail(f"devices[{i}].rank", f"must be between {low} and {high}")
        if not 0 <= device.idle_watts <= device.full_watts:
            fail(f"devices[{i}].full_watts", "must be at least idle_watts, both non-negative")
        if not 0 < device.agent_port < 65536:
            fail(f"devices[{i}].agent_port", "must be a TCP port, 1 to 65535")
    if fed.min_devices > max(len(config.devices), 1):
        fail(
            "federation.min_devices",
            f"is {fed.min_devices} but the fleet has {len(config.devices)} devices",
        )
    ranks = {config.rank_of(d) for d in config.devices}
    if fed.aggregation == "fedavg" and len(ranks) > 1:
        fail(
            "federation.aggregation",
            "fedavg averages A and B element-wise and needs one "
            f"rank on every device, found ranks {sorted(ranks)}; use svd",
        )


def _is_host(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return bool(HOST_NAME.fullmatch(value))


def _is_safe_path(value: str) -> bool:
    """Absolute, no `..` and nothing a shell or a template would read as syntax."""
    return bool(SAFE_PATH.fullmatch(value)) and ".." not in value.split("/")


def as_yaml_dict(config: FleetConfig) -> dict:
    """The config as plain data, to write back as YAML."""

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, list | tuple) else value

    data = plain(dataclasses.asdict(config))
    data.pop("source")
    return data


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
