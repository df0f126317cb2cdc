"""The device's clock against the coordinator's: the `Date` of the front door's answer to
`HEAD /`, checked every `CHECK_EVERY_S` by the agent.

A board without a real-time clock (a Pi Zero) starts with a wrong time until NTP answers; Flower
then refuses its signed requests (more than 5 s ahead or 300 s behind) and the operator would see
only "offline". The agent exports the offset, `fleet status` prints it and an alert rule fires.
Standard library only (the agent is resident on a 512 MB board).
"""

from __future__ import annotations

import calendar
import socket
import ssl
import threading
import time
from collections import Counter

CHECK_EVERY_S = 30.0
TIMEOUT_S = 5.0
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(value: str) -> float:
    """Seconds since the epoch of an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`), locale-free."""
    _, day, month, year, clock, zone = value.split()
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    if zone != "GMT":
        raise ValueError(f"not an HTTP date: {value!r}")
    return float(
        calendar.timegm(
            (int(year), MONTHS.index(month) + 1, int(day), hours, minutes, seconds, 0, 0, 0)
        )
    )


def door_offset(door: str, ca_cert: str | None, timeout: float = TIMEOUT_S) -> float:
    """This machine's clock minus the door's: `HEAD /` over TLS checked with the fleet's CA (plain
    HTTP without one). The Date has whole seconds: the offset is good to about half a second."""
    host, port = door.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout) as raw:
        stream = raw
        if ca_cert is not None:
            stream = ssl.create_default_context(cafile=ca_cert).wrap_socket(
                raw, server_hostname=host
            )
        sent = time.time()
        stream.sendall(f"HEAD / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = stream.recv(4096)
            if not chunk:
                break
            head += chunk
        received = time.time()
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "date":
            return (sent + received) / 2 - (http_date(value.strip()) + 0.5)
    raise ValueError("the front door's answer has no Date")


class ClockCheck:
    """`door_offset` every `every_s` in a daemon thread; the last offset (None until one
    succeeds, or after a failure) and failures by kind for the agent's scrape."""

    def __init__(self, door: str, ca_cert: str | None, every_s: float = CHECK_EVERY_S) -> None:
        self.door, self.ca_cert, self.every_s = door, ca_cert, every_s
        self.offset: float | None = None
        self.errors: Counter[str] = Counter()
        self._stop = threading.Event()

    def check(self) -> None:
        try:
            self.offset = door_offset(self.door, self.ca_cert)
        except ssl.SSLError as exc:
            # "certificate is not yet valid": this clock is before the certificate's start
            self.offset = None
            self.errors["not_yet_valid" if "not yet valid" in str(exc) else "tls"] += 1
        except (OSError, ValueError):
            self.offset = None
            self.errors["unreachable"] += 1

    def start(self) -> ClockCheck:
        def loop() -> None:
            while not self._stop.is_set():
                self.check()
                self._stop.wait(self.every_s)

        threading.Thread(target=loop, daemon=True, name="clock-check").start()
        return self

    def stop(self) -> None:
        self._stop.set()
