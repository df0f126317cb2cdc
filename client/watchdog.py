"""The SuperNode watchdog: a SuperNode with no connection to the coordinator for `BOUND_S` is
stopped, and its service starts it again.

Flower's SuperNode gives up on a TLS error mid-connection (as a flooded front door causes:
"SSL/TLS handshake error detected") and then waits for ever, alive, with no connection to the
coordinator; it never exits, so no service manager restarts it. A working SuperNode polls every
3 s and sends a heartbeat about every 20 s, each over a connection it keeps a few seconds, so a
SuperNode seen with no established TCP connection to the front door for a minute is stuck. The
agent runs this (it is the same user as the SuperNode); it reads the SuperNode's sockets from
/proc (`/proc/PID/fd` and `/proc/PID/net/tcp`), nothing else. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

BOUND_S = 60.0  # three missed heartbeats
EVERY_S = 2.0
STOP_GRACE_S = 10.0
ESTABLISHED = "01"


def _tcp_remote(address: str, port: int) -> set[str]:
    """How /proc/net/tcp and tcp6 write `address:port` as a remote end (IPv4, v4-mapped IPv6)."""
    packed = socket.inet_aton(address)
    v4 = packed[::-1].hex().upper()
    v6 = "0000000000000000FFFF0000" + v4
    return {f"{v4}:{port:04X}", f"{v6}:{port:04X}"}


class SuperNodeWatchdog:
    """Watches this device's SuperNode processes (by their command line: `--superlink DOOR` and
    `device='NAME'`); `check()` once, `start()` every `EVERY_S` in a daemon thread."""

    def __init__(
        self,
        device: str,
        door: str,
        proc_root: Path = Path("/proc"),
        bound_s: float = BOUND_S,
    ) -> None:
        self.device, self.door = device, door
        self.proc_root, self.bound_s = Path(proc_root), bound_s
        self.restarts = 0
        self._seen: dict[int, float] = {}  # pid -> when it last had a connection (or appeared)
        self._stop = threading.Event()

    def supernodes(self) -> list[int]:
        mine = f"device='{self.device}'"
        found = []
        for entry in self.proc_root.iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if entry.stat().st_uid != os.getuid():
                    continue
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                if (  # its script, run by python (under qemu user mode: qemu, python, script)
                    any(arg.endswith("flower-supernode") for arg in argv[:4])
                    and self.door in argv
                    and any(mine in arg for arg in argv)
                ):
                    found.append(int(entry.name))
        return found

    def connected(self, pid: int) -> bool:
        """Whether `pid` holds an established TCP connection to the door."""
        host, port = self.door.rsplit(":", 1)
        try:
            remote = _tcp_remote(socket.gethostbyname(host), int(port))
            fds = self.proc_root / str(pid) / "fd"
            inodes = {
                os.readlink(fd)[8:-1]
                for fd in fds.iterdir()
                if os.readlink(fd).startswith("socket:[")
            }
            for table in ("tcp", "tcp6"):
                path = self.proc_root / str(pid) / "net" / table
                if not path.is_file():
                    continue
                for line in path.read_text().splitlines()[1:]:
                    fields = line.split()
                    if fields[2] in remote and fields[3] == ESTABLISHED and fields[9] in inodes:
                        return True
        except (OSError, ValueError, IndexError):
            return True  # cannot tell (it just exited, or no name lookup): leave it be
        return False

    def check(self, now: float | None = None) -> list[int]:
        """Stop every SuperNode of this device stuck for longer than the bound; their pids."""
        now = time.monotonic() if now is None else now
        pids = self.supernodes()
        self._seen = {pid: self._seen.get(pid, now) for pid in pids}
        stopped = []
        for pid in pids:
            if self.connected(pid):
                self._seen[pid] = now
            elif now - self._seen[pid] > self.bound_s:
                print(
                    f"watchdog: SuperNode {pid} of {self.device} has had no connection to "
                    f"{self.door} for {now - self._seen[pid]:.0f} s; stopping it (its service "
                    "starts it again)",
                    flush=True,
                )
                _stop(pid, self.proc_root)
                self.restarts += 1
                stopped.append(pid)
                del self._seen[pid]
        return stopped

    def start(self, every_s: float = EVERY_S) -> SuperNodeWatchdog:
        def loop() -> None:
            while not self._stop.wait(every_s):
                self.check()

        threading.Thread(target=loop, daemon=True, name="supernode-watchdog").start()
        return self

    def stop(self) -> None:
        self._stop.set()


def _stop(pid: int, proc_root: Path) -> None:
    """SIGTERM (the SuperNode leaves gracefully), SIGKILL if it is still there after a while."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            if not _alive(pid, proc_root):
                return
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int, proc_root: Path) -> bool:
    """Running, not a zombie its service has yet to collect."""
    try:
        stat = (proc_root / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
