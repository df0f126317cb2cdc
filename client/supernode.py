"""The device's long-lived Flower process: the `flower-supernode` command line for one device."""

from __future__ import annotations

from pathlib import Path


def supernode_command(
    superlink: str,
    device: str,
    state_dir: Path,
    port: int = 9094,
    ca_cert: Path | None = None,
    node_key: Path | None = None,
    data_dir: Path | None = None,
) -> list[str]:
    """Connect to `superlink` (host:port) as `device`; TLS and node authentication when a CA
    certificate and a node key are given, plain HTTP otherwise."""
    node_config = f"device='{device}' state-dir='{state_dir}'"
    if data_dir is not None:
        node_config += f" data-dir='{data_dir}'"
    command = [
        "flower-supernode",
        "--superlink",
        superlink,
        "--node-config",
        node_config,
        "--port",
        str(port),
    ]
    if ca_cert is not None and node_key is not None:
        return [
            *command,
            "--root-certificates",
            str(ca_cert),
            "--auth-supernode-private-key",
            str(node_key),
        ]
    return [*command, "--insecure"]
