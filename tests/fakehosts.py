"""Fake devices for deployment tests: network namespaces on a private bridge, each with its own
sshd (key login), hostname, /etc/hosts and empty resolv.conf (so name lookups do not wait).

Only addresses inside namespaces made here are used (10.231.0.0/24 on a bridge of our own).
Teardown kills every process of each namespace, waits until none are left, then removes links,
namespaces and the bridge, so that the next set-up does not fail with "File exists".
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BRIDGE = "s2fbr0"
SUBNET = "10.231.0"
COORDINATOR_IP = f"{SUBNET}.1"


@dataclass(frozen=True)
class FakeHost:
    name: str
    address: str
    folder: Path  # its files: sshd config and keys, hosts, and where it installs things


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _netns_pids(namespace: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


def _teardown(names: list[str]) -> None:
    for name in names:
        for pid in _netns_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _netns_pids(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["ip", "link", "del", f"veth-{name}"], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def ssh_keypair(folder: Path) -> Path:
    """An ed25519 key for logging in to the fake hosts; returns the private key's path."""
    key = folder / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@contextlib.contextmanager
def fake_hosts(folder: Path, count: int, login_key: Path) -> Iterator[list[FakeHost]]:
    names = [f"s2f{i + 1}" for i in range(count)]
    _teardown(names)  # leftovers of a run that was killed
    hosts = []
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{COORDINATOR_IP}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for i, name in enumerate(names):
            host = FakeHost(name, f"{SUBNET}.{11 + i}", folder / name)
            host.folder.mkdir(parents=True, exist_ok=True)
            _ip("netns", "add", name)
            _ip("link", "add", f"veth-{name}", "type", "veth", "peer", "name", "eth0",
                "netns", name)  # fmt: skip
            _ip("link", "set", f"veth-{name}", "master", BRIDGE, "up")
            inside = ["ip", "netns", "exec", name]
            for command in (
                ["ip", "addr", "add", f"{host.address}/24", "dev", "eth0"],
                ["ip", "link", "set", "eth0", "up"],
                ["ip", "link", "set", "lo", "up"],
            ):
                subprocess.run([*inside, *command], check=True, capture_output=True)
            (host.folder / "hosts").write_text(
                f"127.0.0.1 localhost\n{host.address} {name}\n{COORDINATOR_IP} coordinator\n"
            )
            (host.folder / "resolv.conf").write_text("")
            if not (host.folder / "host_key").exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                                str(host.folder / "host_key")], check=True)  # fmt: skip
            (host.folder / "authorized_keys").write_text(login_key.with_suffix(".pub").read_text())
            (host.folder / "sshd_config").write_text(
                f"ListenAddress {host.address}\nHostKey {host.folder / 'host_key'}\n"
                f"PidFile {host.folder / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {host.folder / 'authorized_keys'}\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                "StrictModes no\nUsePAM no\nUseDNS no\n"
                "Subsystem sftp internal-sftp\n"
            )
            Path("/run/sshd").mkdir(exist_ok=True)
            script = (
                f"hostname {name} && mount --bind {host.folder / 'hosts'} /etc/hosts && "
                f"mount --bind {host.folder / 'resolv.conf'} /etc/resolv.conf && "
                f"exec /usr/sbin/sshd -D -f {host.folder / 'sshd_config'}"
            )
            subprocess.Popen([*inside, "unshare", "--uts", "--mount", "--propagation", "private",
                              "sh", "-c", script], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            hosts.append(host)
        for host in hosts:  # sshd is up when it accepts a login
            deadline = time.monotonic() + 20
            while subprocess.run(ssh_command(host, login_key, "true"), capture_output=True,
                                 timeout=20).returncode != 0:  # fmt: skip
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd of {host.name} did not come up")
                time.sleep(0.2)
        yield hosts
    finally:
        _teardown(names)


def ssh_command(host: FakeHost, key: Path, *command: str) -> list[str]:
    return ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o",
            "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            f"root@{host.address}", *command]  # fmt: skip
