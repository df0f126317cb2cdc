"""The command lines of a device's long-lived processes: its SuperNode, the SuperExec that runs
its ClientApps, its agent and its prediction service.

The coordinator renders them into services (`fleet deploy`) and the loopback deployment starts
them directly, so both run a device the same way. The agent runs as its own module, so a device
never loads the coordinator's command line."""

from __future__ import annotations

import importlib
from pathlib import Path

from skip2fleet.shared.protocol import NodeConfig


def supernode_command(
    superlink: str,
    device: str,
    state_dir: Path,
    port: int = 9094,
    ca_cert: Path | None = None,
    node_key: Path | None = None,
    data_dir: Path | None = None,
    superexec_secret: Path | None = None,
) -> list[str]:
    """Connect to `superlink` (host:port) as `device`; TLS and node authentication when a CA
    certificate and a node key are given, plain HTTP otherwise. With `superexec_secret`, the
    ClientApps run in a separate SuperExec (`superexec_command`, which may run as another user)
    that proves itself with that secret; without, the SuperNode starts its own as a child."""
    node_config = f"{NodeConfig.DEVICE}='{device}' {NodeConfig.STATE_DIR}='{state_dir}'"
    if data_dir is not None:
        node_config += f" {NodeConfig.DATA_DIR}='{data_dir}'"
    command = [
        "flower-supernode",
        "--superlink",
        superlink,
        "--node-config",
        node_config,
        "--port",
        str(port),
    ]
    if superexec_secret is not None:
        command += ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret)]
    if ca_cert is not None and node_key is not None:
        return [
            *command,
            "--root-certificates",
            str(ca_cert),
            "--auth-supernode-private-key",
            str(node_key),
        ]
    return [*command, "--insecure"]


def superexec_command(superexec_secret: Path, port: int = 9094) -> list[str]:
    """The runner of the device's ClientApps, beside an isolated SuperNode on `port`."""
    return [
        "flower-superexec",
        "--runtime-api-address",
        f"127.0.0.1:{port}",
        "--insecure",  # loopback on the device itself
        "--superexec-auth-secret-file",
        str(superexec_secret),
    ]


AGENT_MODULE = "skip2fleet.client.telemetry.agent"
# The device's Flower ClientApps, as Flower names components (`module:attribute`).
CLIENTAPP = "skip2fleet.client.clientapp:app"
NOOP_CLIENTAPP = "skip2fleet.client.noop:app"  # no work: Flower's own cost, for `fleet bench round`
FAULTY_CLIENTAPP = "skip2fleet.client.faulty:app"  # poisons chosen rounds, for the fault suite


def agent_command(python: Path, device_file: Path) -> list[str]:
    """The device's Prometheus exporter; where it serves and what it samples are in its device
    file (`shared/devicefile.py`)."""
    return [str(python), "-m", AGENT_MODULE, "--config", str(device_file)]


SERVE_ARGS = ("-m", "skip2fleet.cli", "serve")  # the device's prediction service


def serve_command(python: Path, state_dir: Path, keep: bool, log_max_mb: float) -> list[str]:
    """`fleet serve` on the device's state folder (its socket and spool live there)."""
    keeping = "--keep" if keep else "--no-keep"
    return [str(python), *SERVE_ARGS, "--state-dir", str(state_dir), keeping,
            "--log-max-mb", str(log_max_mb)]  # fmt: skip


def load_component(reference: str):
    """The object a `module:attribute` reference names, as Flower loads app components."""
    module, attribute = reference.split(":")
    return getattr(importlib.import_module(module), attribute)
