"""`fleet deploy`: putting the fleet in place with Ansible.

`fleet deploy` renders the inventory and every service's command line from fleet.yaml (the same
functions the loopback deployment uses), creates the credentials once, writes the monitoring
configuration, and runs `ansible/site.yml` through ansible-runner, printing each host's tasks as
they finish. Each device's role has the controller build a wheelhouse for the board's platform
(`wheelhouse.py`) while the coordinator's services start. A host that cannot be reached is named in
the summary, the others are still deployed, and the exit code is 1.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Annotated

import typer

from skip2fleet.server import options as opt
from skip2fleet.server.federation.pushes import PUSH_USER
from skip2fleet.server.operations import wheelhouse
from skip2fleet.server.operations.certs import Credentials, credentials_for
from skip2fleet.server.operations.devices import SUPERNODE_PORT, data_folder, device_settings
from skip2fleet.server.operations.frontdoor import CONFIG_NAME, nginx_command, write_nginx_config
from skip2fleet.server.operations.monitoring import write_monitoring
from skip2fleet.server.operations.schedule import next_elapse
from skip2fleet.server.operations.superlink import (
    superlink_command,
)
from skip2fleet.server.progress import stderr
from skip2fleet.shared.atomic import write_atomic, write_text_atomic
from skip2fleet.shared.config import Device, FleetConfig, load_config, state_dir
from skip2fleet.shared.devicefile import DEVICE_FILE
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.process import PROCESS_SETTINGS
from skip2fleet.shared.services import (
    agent_command,
    serve_command,
    superexec_command,
    supernode_command,
)

# Package data (a folder without __init__.py, so that it never shadows Ansible's own `ansible`).
ANSIBLE_DIR = wheelhouse.package_root("ansible")
SERVICE_USER = "skip2fleet"  # a device's services run as this system user, never as root
APP_USER = "skip2fleet-app"  # its ClientApps as this one, which cannot read the node key
SUPEREXEC_SECRET = "superexec.secret"  # made on the device: the SuperNode and SuperExec share it
MIN_FREE_MB = 600
PUSHGATEWAY_WEB_CONFIG = "pushgateway/web.yml"
HOST_KEY_CHANGED = "REMOTE HOST IDENTIFICATION HAS CHANGED"


def device_etc(fleet: FleetConfig, device: Device, creds: Credentials) -> Path:
    """A device's etc/ (its own device file, CA certificate, node key) as one archive named by
    its content hash; the device unpacks it only when that hash is new to it."""
    home = Path(device.install_dir)
    folder = state_dir(fleet) / "devices" / device.name
    own = write_text_atomic(
        folder / DEVICE_FILE,
        device_settings(fleet, device, home / "state", ca_cert=home / "etc" / "ca.crt").text(),
    )
    files = {
        f"etc/{DEVICE_FILE}": own,
        "etc/ca.crt": creds.ca_cert,
        "etc/node.key": creds.node_key(device.name),
    }
    return content_archive(folder, "etc", files, 0o600)


def content_archive(folder: Path, kind: str, files: dict[str, Path], mode: int) -> Path:
    """`<kind>-<hash>.tar` in `folder`: the files under their names, and a `.<kind>-<hash>`
    marker beside them, so that a host unpacks it only when the content is new to it."""
    digest = hashlib.sha256(
        b"".join(name.encode() + path.read_bytes() for name, path in sorted(files.items()))
    ).hexdigest()[:12]
    archive = folder / f"{kind}-{digest}.tar"
    if not archive.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f".{kind}-{digest}"
        marker.write_text("")

        def write(raw) -> None:
            with tarfile.open(fileobj=raw, mode="w") as tar:
                for name, path in {**files, marker.name: marker}.items():
                    info = tar.gettarinfo(str(path), name)
                    info.mode = mode
                    with path.open("rb") as handle:
                        tar.addfile(info, handle)

        write_atomic(archive, write, mode=0o600)  # whatever it holds: a device's has its key
    return archive


def pushgateway_web_config(creds: Credentials) -> str:
    """The Pushgateway's web configuration: basic auth, the password's bcrypt hash (hashed
    once and kept, so that an unchanged fleet redeploys with nothing changed)."""
    import bcrypt

    stored = creds.pushgateway_password.with_suffix(".bcrypt")
    if not stored.is_file():
        password = creds.pushgateway_password.read_bytes().strip()
        write_text_atomic(stored, bcrypt.hashpw(password, bcrypt.gensalt()).decode(), 0o600)
    return f"basic_auth_users:\n  {PUSH_USER}: {stored.read_text()}\n"


def coordinator_archive(fleet: FleetConfig, creds: Credentials) -> Path:
    """The coordinator's generated files (front door, Prometheus, Grafana) as one archive."""
    out = state_dir(fleet) / "coordinator-files"
    written = [
        *write_monitoring(fleet, out),
        write_nginx_config(fleet, creds, out / "frontdoor"),
        write_text_atomic(out / PUSHGATEWAY_WEB_CONFIG, pushgateway_web_config(creds)),
    ]
    return content_archive(
        state_dir(fleet), "coordinator", {str(p.relative_to(out)): p for p in written}, 0o644
    )


def device_vars(fleet: FleetConfig, device: Device, creds: Credentials) -> dict:
    home = Path(device.install_dir)
    superlink = f"{fleet.coordinator.address}:{fleet.coordinator.port}"
    tls = fleet.coordinator.tls
    supernode = supernode_command(
        superlink,
        device.name,
        home / "state",
        SUPERNODE_PORT,
        home / "etc" / "ca.crt" if tls else None,
        home / "etc" / "node.key" if tls else None,
        Path(data_folder(fleet, device)) if data_folder(fleet, device) else None,
        home / "etc" / SUPEREXEC_SECRET,
    )
    superexec = superexec_command(home / "etc" / SUPEREXEC_SECRET, SUPERNODE_PORT)
    return {
        "ansible_host": device.host,
        "ansible_user": device.ssh_user,
        "ansible_python_interpreter": device.python,
        "install_dir": str(home),
        "service_user": SERVICE_USER,
        "app_user": APP_USER,
        "superexec_secret": str(home / "etc" / SUPEREXEC_SECRET),
        "device_etc": str(device_etc(fleet, device, creds)),
        "supernode_argv": [str(home / "venv" / "bin" / supernode[0]), *supernode[1:]],
        "superexec_argv": [str(home / "venv" / "bin" / superexec[0]), *superexec[1:]],
        "agent_argv": agent_command(home / "venv" / "bin" / "python", home / "etc" / DEVICE_FILE),
        "serve_argv": serve_argv(fleet, home),
    }


def serve_argv(fleet: FleetConfig, home: Path) -> list[str]:
    """`fleet serve` as the device's service; none when fleet.yaml turns it off."""
    serve = fleet.serve
    if not serve.enabled:
        return []
    return serve_command(home / "venv" / "bin" / "python", home / "state", serve.keep,
                         serve.log_max_mb)  # fmt: skip


def coordinator_vars(fleet: FleetConfig, creds: Credentials) -> dict:
    state = state_dir(fleet)
    bin_dir = Path(sys.executable).parent
    superlink = superlink_command(fleet, creds)
    gateway = fleet.coordinator.pushgateway or "127.0.0.1:9091"
    return {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "coordinator_dir": str(state / "coordinator"),
        "coordinator_archive": str(coordinator_archive(fleet, creds)),
        "schedule": fleet.federation.schedule or "",
        "fleet_cli": f"{sys.executable} -m skip2fleet.cli",
        "superlink_argv": [str(bin_dir / superlink[0]), *superlink[1:]],
        "frontdoor_argv": nginx_command(fleet, state / "coordinator" / "frontdoor" / CONFIG_NAME),
        "pushgateway_argv": [
            "prometheus-pushgateway",
            f"--web.listen-address={gateway}",
            f"--web.config.file={state / 'coordinator' / PUSHGATEWAY_WEB_CONFIG}",
            f"--persistence.file={state / 'coordinator/pushgateway.metrics'}",
        ],
        "prometheus_argv": [
            "prometheus",
            f"--config.file={state / 'coordinator/prometheus/prometheus.yml'}",
            f"--storage.tsdb.path={state / 'coordinator/prometheus/data'}",
            f"--web.listen-address=127.0.0.1:{fleet.coordinator.prometheus_port}",
        ],
    }


def known_hosts(fleet: FleetConfig) -> Path:
    """The devices' SSH host keys, as first seen: the project's own, in the state folder."""
    return state_dir(fleet) / "known_hosts"


def deploy(
    fleet: FleetConfig, fleet_file: Path, check: bool, limit: list[str], ssh_key: Path | None
) -> dict:
    import ansible_runner

    unknown = sorted(set(limit) - {d.name for d in fleet.devices})
    if unknown:
        raise FleetError(f"--limit: no device {', '.join(map(repr, unknown))} in {fleet_file}")
    if fleet.federation.schedule:
        next_elapse(fleet.federation.schedule)  # systemd reads it, or the deploy stops here
    creds = credentials_for(fleet)  # created once, before any host needs them
    build = wheelhouse.build_id()
    extravars = {
        "fleet_file": str(fleet_file.resolve()),
        "build_id": build,
        "wheelhouse_command": " ".join(
            [sys.executable, "-m", wheelhouse.__name__, str(state_dir(fleet)), build]
        ),
        "controller_python": sys.executable,
        "min_free_mb": MIN_FREE_MB,
        "process_env": PROCESS_SETTINGS,  # every service's environment (shared/process.py)
    }
    inventory = {
        "all": {
            "children": {
                "coordinator": {"hosts": {"coordinator": coordinator_vars(fleet, creds)}},
                "devices": {"hosts": {d.name: device_vars(fleet, d, creds) for d in fleet.devices}},
            }
        }
    }
    reasons: dict[str, str] = {}

    def on_event(event: dict) -> bool:
        data = event.get("event_data", {})
        kind = event.get("event", "")
        outcome = {
            "runner_on_ok": "changed" if data.get("res", {}).get("changed") else "ok",
            "runner_on_failed": "FAILED",
            "runner_on_unreachable": "UNREACHABLE",
        }.get(kind)
        if outcome and not (kind == "runner_on_failed" and data.get("ignore_errors")):
            stderr.print(
                f"  {data.get('host', '?'):<12} {outcome:<11} {data.get('task', '')}"
                f" ({data.get('duration', 0):.1f} s)",
                highlight=False,
            )
            if outcome in ("FAILED", "UNREACHABLE"):
                reasons[data["host"]] = str(data.get("res", {}).get("msg", "")).strip()[:600]
        return True

    runner_dir = state_dir(fleet) / "ansible"
    for written_once in ("inventory", "env"):  # ansible-runner never overwrites these
        shutil.rmtree(runner_dir / written_once, ignore_errors=True)
    runner_dir.mkdir(parents=True, exist_ok=True)
    # A device's host key is learnt on first contact and checked on every later one.
    ssh_args = (
        f"-o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={known_hosts(fleet)} "
        "-o ControlMaster=auto -o ControlPersist=60s"
    )
    result = ansible_runner.run(
        private_data_dir=str(runner_dir),
        project_dir=str(ANSIBLE_DIR),
        playbook=str(ANSIBLE_DIR / "site.yml"),
        inventory=inventory,
        extravars=extravars,
        limit=",".join(["coordinator", *limit]) if limit else None,
        cmdline="--check" if check else None,
        event_handler=on_event,
        quiet=True,
        envvars={
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            # SSH connections are shared for a minute; their sockets live with the fleet's state.
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(state_dir(fleet) / "ssh"),
            "ANSIBLE_SSH_ARGS": ssh_args,
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_FORKS": "10",
            "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
            "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
            **({"ANSIBLE_PRIVATE_KEY_FILE": str(ssh_key)} if ssh_key else {}),
        },
    )
    stats = result.stats or {}
    hosts = sorted(
        set().union(*(stats.get(k, {}) for k in ("ok", "changed", "failures", "dark", "skipped")))
    )
    return {
        "hosts": {
            h: {
                k: stats.get(key, {}).get(h, 0)
                for k, key in (
                    ("ok", "ok"),
                    ("changed", "changed"),
                    ("failed", "failures"),
                    ("unreachable", "dark"),
                )
            }
            for h in hosts
        },
        "reasons": reasons,
        "status": result.status,
    }


def deploy_command(
    config: opt.ConfigPath = Path("fleet.yaml"),
    check: Annotated[bool, typer.Option(help="A dry run: show what would change.")] = False,
    limit: Annotated[
        list[str] | None, typer.Option(help="Deploy only this device (repeatable).")
    ] = None,
    ssh_key: Annotated[Path | None, typer.Option(help="SSH private key for the devices.")] = None,
) -> None:
    """Install and start the coordinator's and the devices' services with Ansible."""
    fleet = load_config(config)
    started = time.monotonic()
    summary = deploy(fleet, config, check, limit or [], ssh_key)
    typer.echo(f"deploy took {time.monotonic() - started:.1f} s")
    typer.echo(f"{'host':<12} {'ok':>4} {'changed':>8} {'failed':>7} {'unreachable':>12}")
    for host, counts in summary["hosts"].items():
        typer.echo(
            f"{host:<12} {counts['ok']:>4} {counts['changed']:>8} {counts['failed']:>7} "
            f"{counts['unreachable']:>12}"
        )
    broken = {h: c for h, c in summary["hosts"].items() if c["failed"] or c["unreachable"]}
    for host in broken:
        typer.echo(f"{host}: {summary['reasons'].get(host) or 'failed'}", err=True)
    changed = [h for h in broken if HOST_KEY_CHANGED in summary["reasons"].get(h, "")]
    if changed:
        hosts = {d.name: d.host for d in fleet.devices}
        raise FleetError(
            "; ".join(
                f"{name}: its SSH host key is not the one recorded at the first deploy "
                f"(another machine at {hosts[name]}, or a reinstalled board); nothing was done "
                f"there. If the new key is right: ssh-keygen -R {hosts[name]} -f "
                f"{known_hosts(fleet)}"
                for name in changed
            )
        )
    if broken or summary["status"] != "successful":
        raise typer.Exit(1)
