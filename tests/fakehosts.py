"""Fake devices for deployment tests: network namespaces on a private bridge, each with its own
sshd (key login), hostname, /etc/hosts and empty resolv.conf (so name lookups do not wait).

Only addresses inside namespaces made here are used (10.231.0.0/24 and 10.232.0.0/24 on bridges
of our own). `systemd_host` boots a Debian root with systemd-nspawn for the systemd path.
Deployments log in as OPERATOR, an ordinary user with passwordless sudo (as `pi` on Raspberry Pi
OS); the hosts' folders lie under /var/tmp (pytest's own temporary folder is closed to other
users, and a device's services run as their own user).
Teardown kills every process of each namespace, waits until none are left, then removes links,
namespaces and the bridge, so that the next set-up does not fail with "File exists".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BRIDGE = "s2fbr0"
SUBNET = "10.231.0"
COORDINATOR_IP = f"{SUBNET}.1"
OPERATOR = "s2fop"
HOSTS_LOCK = Path("/run/lock/skip2fleet-test-hosts.lock")
_held = 0  # how deep this process is inside `exclusive_hosts`


@contextlib.contextmanager
def exclusive_hosts() -> Iterator[None]:
    """Hold the machine's fake hosts for this process: their namespaces, bridges and users have
    fixed names, so two test runs at once (two checkouts on one machine) would tear each other's
    hosts down. Re-entrant, so a systemd host inside `fake_hosts` does not wait for itself."""
    global _held
    if _held:
        _held += 1
        try:
            yield
        finally:
            _held -= 1
        return
    HOSTS_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with HOSTS_LOCK.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _held = 1
        try:
            yield
        finally:
            _held = 0


def operator_user() -> str:
    """OPERATOR on this machine (the namespaces share its users), with passwordless sudo; a
    password of '*' rather than useradd's '!', which sshd reads as a locked account."""
    if subprocess.run(["id", OPERATOR], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", OPERATOR], check=True)
    subprocess.run(["usermod", "--password", "*", OPERATOR], check=True)
    sudoers = Path("/etc/sudoers.d") / OPERATOR
    sudoers.write_text(f"{OPERATOR} ALL=(ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    return OPERATOR


@dataclass(frozen=True)
class FakeHost:
    name: str
    address: str
    folder: Path  # its files: sshd config and keys, hosts, and where it installs things


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def netns_pids(namespace: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


def _teardown(names: list[str]) -> None:
    for name in names:
        for pid in netns_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while netns_pids(name) and time.monotonic() < deadline:
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
def fake_hosts(count: int, login_key: Path) -> Iterator[list[FakeHost]]:
    with exclusive_hosts():
        yield from _fake_hosts(count, login_key)


def _fake_hosts(count: int, login_key: Path) -> Iterator[list[FakeHost]]:
    names = [f"s2f{i + 1}" for i in range(count)]
    _teardown(names)  # leftovers of a run that was killed
    operator_user()
    folder = Path(tempfile.mkdtemp(prefix="skip2fleet-hosts-", dir="/var/tmp"))
    folder.chmod(0o755)
    hosts = []
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{COORDINATOR_IP}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for i, name in enumerate(names):
            host = FakeHost(name, f"{SUBNET}.{11 + i}", folder / name)
            host.folder.mkdir(parents=True, exist_ok=True)
            _ip("netns", "add", name)
            _ip(
                "link", "add", f"veth-{name}", "type", "veth", "peer", "name", "eth0", "netns", name
            )
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
                subprocess.run(
                    [
                        "ssh-keygen",
                        "-q",
                        "-t",
                        "ed25519",
                        "-N",
                        "",
                        "-f",
                        str(host.folder / "host_key"),
                    ],
                    check=True,
                )
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
            subprocess.Popen(
                [
                    *inside,
                    "unshare",
                    "--uts",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script,
                ],
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            hosts.append(host)
        for host in hosts:  # sshd is up when it accepts a login
            deadline = time.monotonic() + 20
            while (
                subprocess.run(
                    ssh_command(host, login_key, "true"), capture_output=True, timeout=20
                ).returncode
                != 0
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd of {host.name} did not come up")
                time.sleep(0.2)
        yield hosts
    finally:
        _teardown(names)
        shutil.rmtree(folder, ignore_errors=True)


def ssh_command(host: FakeHost, key: Path, *command: str) -> list[str]:
    return [
        "ssh",
        "-i",
        str(key),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        f"root@{host.address}",
        *command,
    ]


SYSTEMD_ROOT = Path(os.environ.get("SKIP2FLEET_TEST_ROOTFS", "/var/tmp/skip2fleet-bookworm"))
SYSTEMD_BRIDGE, SYSTEMD_SUBNET = "s2fbr9", "10.232.0"
SYSTEMD_PACKAGES = (
    "systemd,systemd-sysv,dbus,openssh-server,sudo,python3,python3-venv,iproute2,procps"
)
SYSTEMD_USER = "pi"  # as Raspberry Pi OS sets it up: an ordinary user with passwordless sudo


def systemd_root() -> Path:
    """A Debian bookworm root with systemd, sshd, sudo, Python and the user `pi`, made once and
    reused (booted with --volatile=overlay, so every test gets it unchanged)."""
    marker = SYSTEMD_ROOT / ".skip2fleet-complete-2"
    if not marker.exists():
        subprocess.run(["rm", "-rf", str(SYSTEMD_ROOT)], check=True)
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={SYSTEMD_PACKAGES}",
                "bookworm",
                str(SYSTEMD_ROOT),
            ],
            check=True,
            capture_output=True,
        )
        chroot = ["chroot", str(SYSTEMD_ROOT)]
        subprocess.run([*chroot, "useradd", "-m", "-s", "/bin/sh", SYSTEMD_USER], check=True)
        subprocess.run([*chroot, "usermod", "-p", "*", SYSTEMD_USER], check=True)
        sudoers = SYSTEMD_ROOT / "etc" / "sudoers.d" / SYSTEMD_USER
        sudoers.write_text(f"{SYSTEMD_USER} ALL=(ALL) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)
        home = f"/home/{SYSTEMD_USER}"
        owner = ["-o", SYSTEMD_USER, "-g", SYSTEMD_USER]
        subprocess.run([*chroot, "install", "-d", "-m", "0700", *owner, f"{home}/.ssh"], check=True)
        marker.write_text("")
    return SYSTEMD_ROOT


@contextlib.contextmanager
def systemd_host(folder: Path, login_key: Path) -> Iterator[FakeHost]:
    """A device whose PID 1 is systemd: systemd-nspawn --boot in a network namespace."""
    with exclusive_hosts():
        yield from _systemd_host(folder, login_key)


def _systemd_host(folder: Path, login_key: Path) -> Iterator[FakeHost]:
    name = "s2fsd"
    host = FakeHost(name, f"{SYSTEMD_SUBNET}.11", folder / name)
    host.folder.mkdir(parents=True, exist_ok=True)
    root = systemd_root()
    cleanup = [
        ["ip", "link", "del", f"veth-{name}"],
        ["ip", "netns", "del", name],
        ["ip", "link", "del", SYSTEMD_BRIDGE],
    ]
    for command in cleanup:
        subprocess.run(command, capture_output=True)
    container = None
    try:
        _ip("link", "add", SYSTEMD_BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{SYSTEMD_SUBNET}.1/24", "dev", SYSTEMD_BRIDGE)
        _ip("link", "set", SYSTEMD_BRIDGE, "up")
        _ip("netns", "add", name)
        _ip("link", "add", f"veth-{name}", "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("link", "set", f"veth-{name}", "master", SYSTEMD_BRIDGE, "up")
        for command in (
            ["ip", "addr", "add", f"{host.address}/24", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", "netns", "exec", name, *command], check=True, capture_output=True)
        container = subprocess.Popen(
            [
                "systemd-nspawn",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--volatile=overlay",
                f"--network-namespace-path=/run/netns/{name}",
                f"--machine={name}",
                "-D",
                str(root),
                f"--bind-ro={login_key.with_suffix('.pub')}:/root/.ssh/authorized_keys",
                f"--bind-ro={login_key.with_suffix('.pub')}:/home/{SYSTEMD_USER}/.ssh/authorized_keys",
            ],
            stdin=subprocess.DEVNULL,
            stdout=(host.folder / "console.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while (
            subprocess.run(
                ssh_command(host, login_key, "systemctl is-system-running --wait"),
                capture_output=True,
                timeout=60,
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline or container.poll() is not None:
                raise RuntimeError(f"the systemd device did not boot; see {host.folder}")
            time.sleep(1)
        yield host
    finally:
        if container is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(container.pid, signal.SIGTERM)
            try:
                container.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(container.pid, signal.SIGKILL)
                container.wait()
        for pid in netns_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for command in cleanup:
            subprocess.run(command, capture_output=True)
