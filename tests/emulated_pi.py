"""An emulated Raspberry Pi for deployment tests: a Debian bookworm arm64 root (Python 3.11 and
glibc 2.36, as Pi OS) run by qemu user mode with `QEMU_CPU=cortex-a53`, in a network namespace
of its own with its own sshd and the ordinary user `pi` with passwordless sudo.

The root is made once per machine with debootstrap (stage 2 runs under qemu: 10-20 minutes) and
kept as a tarball under ~/.cache/skip2fleet, which a test unpacks in seconds. `python -m
tests.emulated_pi` makes the cache and prints how long it took.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.fakehosts import BRIDGE, COORDINATOR_IP, SUBNET, FakeHost, netns_pids, ssh_command

CACHE = Path(os.environ.get("SKIP2FLEET_CACHE", Path.home() / ".cache" / "skip2fleet"))
TARBALL = CACHE / "bookworm-arm64-1.tar.gz"  # bump the number when the recipe changes
PACKAGES = "python3,python3-venv,openssh-server,sudo,iproute2,procps,ca-certificates"
PI_USER = "pi"
QEMU_ENV = {"QEMU_CPU": "cortex-a53"}  # a Pi's core: no SVE for NumPy, an armv8 OpenBLAS kernel
BINFMT = Path("/proc/sys/fs/binfmt_misc")
NAME = "s2fpi"  # its network namespace, on fake_hosts' bridge
ADDRESS = f"{SUBNET}.30"


# qemu-user-static's own registration (update-binfmts) has the flags PF; sudo inside the root
# needs C too (a setuid program gets its own credentials, not the interpreter's: without it sudo
# says "effective uid is not 0"), so the entry is registered again with POCF.
AARCH64_MAGIC = r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
AARCH64_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
QEMU_INTERPRETER = "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"


def enable_binfmt() -> None:
    """Register qemu-aarch64 with the kernel (binfmt_misc is not mounted by default), so that
    arm64 programs run, setuid ones included."""
    if not (BINFMT / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=True)
    flags = next(line for line in entry.read_text().splitlines() if line.startswith("flags:"))
    if "C" not in flags:
        entry.write_text("-1")
        (BINFMT / "register").write_text(
            f":qemu-aarch64:M::{AARCH64_MAGIC}:{AARCH64_MASK}:{QEMU_INTERPRETER}:POCF"
        )


def _chroot(root: Path, *command: str) -> None:
    env = {**os.environ, **QEMU_ENV, "LC_ALL": "C"}
    subprocess.run(["chroot", str(root), *command], check=True, capture_output=True, env=env)


def arm64_tarball() -> Path:
    """The cached arm64 root, made unless it is there (under a lock: one maker at a time)."""
    enable_binfmt()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if TARBALL.is_file():
            return TARBALL
        with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="skip2fleet-arm64-") as tmp:
            root = Path(tmp) / "root"
            subprocess.run(
                [
                    "debootstrap",
                    "--arch=arm64",
                    "--foreign",
                    "--variant=minbase",
                    f"--include={PACKAGES}",
                    "bookworm",
                    str(root),
                ],
                check=True,
                capture_output=True,
            )
            _chroot(root, "/debootstrap/debootstrap", "--second-stage")
            _chroot(root, "useradd", "-m", "-s", "/bin/sh", PI_USER)
            _chroot(root, "usermod", "-p", "*", PI_USER)
            sudoers = root / "etc" / "sudoers.d" / PI_USER
            sudoers.write_text(f"{PI_USER} ALL=(ALL) NOPASSWD: ALL\n")
            sudoers.chmod(0o440)
            _chroot(
                root,
                "install",
                "-d",
                "-m",
                "0700",
                "-o",
                PI_USER,
                "-g",
                PI_USER,
                f"/home/{PI_USER}/.ssh",
            )
            partial = TARBALL.with_suffix(".partial")
            subprocess.run(["tar", "-C", str(root), "-czf", str(partial), "."], check=True)
            partial.replace(TARBALL)
    return TARBALL


def _configure(root: Path, login_key: Path) -> None:
    """sshd on ADDRESS for `pi` and root with `login_key`; every session, and sudo, keep
    QEMU_CPU (each program run starts a new qemu, which reads it)."""
    (root / "etc" / "hostname").write_text(f"{NAME}\n")
    (root / "etc" / "hosts").write_text(
        f"127.0.0.1 localhost\n{ADDRESS} {NAME}\n{COORDINATOR_IP} coordinator\n"
    )
    (root / "etc" / "resolv.conf").write_text("")  # no lookups that wait
    (root / "etc" / "ssh" / "authorized_keys").write_text(login_key.with_suffix(".pub").read_text())
    qemu = " ".join(f"{k}={v}" for k, v in QEMU_ENV.items())
    (root / "etc" / "ssh" / "sshd_config").write_text(
        f"ListenAddress {ADDRESS}\nPidFile /run/sshd.pid\n"
        "HostKey /etc/ssh/ssh_host_ed25519_key\n"
        "AuthorizedKeysFile /etc/ssh/authorized_keys\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"StrictModes no\nUsePAM no\nUseDNS no\nSetEnv {qemu}\n"
        "Subsystem sftp internal-sftp\n"
    )
    keep = root / "etc" / "sudoers.d" / "qemu"
    keep.write_text(f'Defaults env_keep += "{" ".join(QEMU_ENV)}"\n')
    keep.chmod(0o440)


def _remove(root: Path) -> None:
    """The unpacked root; never into a mount (its /dev is the host's while the device runs)."""
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)


@contextlib.contextmanager
def emulated_pi(folder: Path, login_key: Path) -> Iterator[FakeHost]:
    """The emulated Pi at ADDRESS on fake_hosts' bridge (call it inside `fake_hosts`): the cached
    root unpacked under `folder`, its sshd started by chroot in a mount namespace of its own
    (proc, sysfs, the host's /dev, an empty /run). Everything it ran is killed on exit."""
    tarball = arm64_tarball()
    host = FakeHost(NAME, ADDRESS, folder / NAME)
    root = host.folder / "root"
    cleanup = [["ip", "link", "del", f"veth-{NAME}"], ["ip", "netns", "del", NAME]]
    for command in cleanup:
        subprocess.run(command, capture_output=True)
    root.mkdir(parents=True)
    try:
        subprocess.run(["tar", "-C", str(root), "-xzf", str(tarball)], check=True)
        _configure(root, login_key)
        subprocess.run(["ip", "netns", "add", NAME], check=True)
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                f"veth-{NAME}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                NAME,
            ],
            check=True,
        )
        subprocess.run(["ip", "link", "set", f"veth-{NAME}", "master", BRIDGE, "up"], check=True)
        for command in (
            ["ip", "addr", "add", f"{ADDRESS}/24", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", "netns", "exec", NAME, *command], check=True)
        script = (
            f"hostname {NAME} && mount -t proc proc {root}/proc && "
            f"mount -t sysfs sysfs {root}/sys && mount --rbind /dev {root}/dev && "
            f"mount -t tmpfs -o mode=0755 tmpfs {root}/run && mkdir -p {root}/run/sshd && "
            f"exec chroot {root} /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config"
        )
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                NAME,
                "unshare",
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            env={**os.environ, **QEMU_ENV},
            start_new_session=True,
            stdout=(host.folder / "sshd.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        login = ssh_command(host, login_key, "true")
        while subprocess.run(login, capture_output=True, timeout=60).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd of the emulated Pi did not come up; see {host.folder}")
            time.sleep(0.5)
        yield host
    finally:
        for pid in netns_pids(NAME):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while netns_pids(NAME) and time.monotonic() < deadline:
            time.sleep(0.05)
        for command in cleanup:
            subprocess.run(command, capture_output=True)
        if not netns_pids(NAME):
            _remove(root)


if __name__ == "__main__":
    started = time.monotonic()
    print(arm64_tarball(), f"{time.monotonic() - started:.1f} s", file=sys.stderr)
