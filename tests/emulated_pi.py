"""An emulated Raspberry Pi for deployment tests: a Debian bookworm arm64 root (Python 3.11 and
glibc 2.36, as Pi OS) run by qemu user mode with `QEMU_CPU=cortex-a53`, in a network namespace
of its own with its own sshd and the ordinary user `pi` with passwordless sudo.

The root is made once per machine with debootstrap (stage 2 runs under qemu: 10-20 minutes) and
kept as a tarball under ~/.cache/skip2fleet, which a test unpacks in seconds. `python -m
tests.emulated_pi` makes the cache and prints how long it took.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("SKIP2FLEET_CACHE", Path.home() / ".cache" / "skip2fleet"))
TARBALL = CACHE / "bookworm-arm64-1.tar.gz"  # bump the number when the recipe changes
PACKAGES = "python3,python3-venv,openssh-server,sudo,iproute2,procps,ca-certificates"
PI_USER = "pi"
QEMU_ENV = {"QEMU_CPU": "cortex-a53"}  # a Pi's core: no SVE for NumPy, an armv8 OpenBLAS kernel
BINFMT = Path("/proc/sys/fs/binfmt_misc")
NAME, BRIDGE, SUBNET = "s2fpi", "s2fbr8", "10.233.0"


def enable_binfmt() -> None:
    """Register qemu-aarch64 with the kernel, so arm64 programs run (not mounted by default)."""
    if not (BINFMT / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    if not (BINFMT / "qemu-aarch64").exists():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=True)


def _chroot(root: Path, *command: str) -> None:
    env = {**os.environ, **QEMU_ENV, "LC_ALL": "C"}
    subprocess.run(["chroot", str(root), *command], check=True, capture_output=True, env=env)


def arm64_tarball() -> Path:
    """The cached arm64 root, made unless it is there (under a lock: one maker at a time)."""
    enable_binfmt()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        import fcntl

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
            _chroot(root, "install", "-d", "-m", "0700", "-o", PI_USER, "-g", PI_USER,
                    f"/home/{PI_USER}/.ssh")  # fmt: skip
            partial = TARBALL.with_suffix(".partial")
            subprocess.run(["tar", "-C", str(root), "-czf", str(partial), "."], check=True)
            partial.replace(TARBALL)
    return TARBALL


if __name__ == "__main__":
    started = time.monotonic()
    print(arm64_tarball(), f"{time.monotonic() - started:.1f} s", file=sys.stderr)
