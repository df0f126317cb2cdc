"""The coordinator's figures on a Prometheus Pushgateway: one group for the fleet, replaced after
every round.

Flower ends the ServerApp's process with the run, so nothing there can be scraped: the coordinator
pushes after every round instead. A Pushgateway is meant for a job's last result, not a history,
so the fleet has one group, the job's own (`job="skip2fleet"`), and each round's push replaces it:
the round is a value (`skip2fleet_round_number`), a device's figures carry only `device` and
`method`, the run is one info series. So Prometheus holds 11 series per device and 10 for the
round, as many after 100 rounds as after one; the history is Prometheus' own storage (a sample per
scrape) and the run folder. A run's first push deletes the job's other groups (earlier versions
pushed one group per round of every run). The body is written in the text format directly and
streamed: at 10,000 devices the push takes well under its timeout (`fleet bench series`).

A Pushgateway that cannot be reached costs one logged line per round: the round has already been
written to the run folder, and the next round's push replaces it anyway.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from skip2fleet.shared import metric_names as names
from skip2fleet.shared.exposition import Family

log = logging.getLogger("skip2fleet")
JOB = "skip2fleet"
PUSH_USER = "skip2fleet"  # the Pushgateway's one basic-auth user
PUSH_TIMEOUT_S = 3.0
TIDY_TIMEOUT_S = 30.0  # listing a gateway that still holds every round of earlier versions
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A device's figures: (result key, scale, metric, the extra label's value or None).
PER_DEVICE = (
    *(
        (f"acc_{phase}", 1 / 100, names.DEVICE_ACCURACY, phase)  # percent -> ratio
        for phase in ("before", "after")
    ),
    *(
        (f"{phase}_ms", 1 / 1e3, names.DEVICE_TRAIN_BATCH, phase)
        for phase in ("forward", "backward", "update")
    ),
    *((f"{stat}_watts", 1.0, names.DEVICE_FINETUNE_POWER, stat) for stat in ("mean", "peak")),
    ("finetune_s", 1.0, names.DEVICE_FINETUNE_SECONDS, None),
    ("uplink_bytes", 1.0, names.DEVICE_UPLINK, None),
    ("energy_joules", 1.0, names.DEVICE_FINETUNE_ENERGY, None),
    ("cache_bytes", 1.0, names.DEVICE_CACHE, None),
)


def round_families(result: dict, run: str, method: str) -> list[Family]:
    """What a push of the round `result` (as the run folder keeps it) holds."""
    families = [
        Family.of(names.RUN_INFO).add([run, method, str(result.get("aggregation", ""))], 1),
        Family.of(names.ROUND_NUMBER).add([], result["round"]),
        Family.of(names.ROUND_DURATION).add([], result["duration_s"]),
        Family.of(names.ROUND_REFUSED).add([], len(result["refused"])),
    ]
    outcomes = Family.of(names.ROUND_DEVICES)
    for outcome in ("devices", "refused", "missing"):
        outcomes.add(["ok" if outcome == "devices" else outcome], len(result[outcome]))
    families.append(outcomes)
    if result.get("svd_relative_error") is not None:
        families.append(Family.of(names.ROUND_SVD_ERROR).add([], result["svd_relative_error"]))
    per_device: dict[str, Family] = {}
    for key, scale, metric, extra in PER_DEVICE:
        family = per_device.setdefault(metric.name, Family.of(metric))
        for device, figures in result["devices"].items():
            labels = [device, method] if extra is None else [device, method, extra]
            family.add(labels, figures[key] * scale)
    return [*families, *per_device.values()]


class FleetPushes:
    """A run's pushes to the fleet's group (with basic auth when the fleet has a Pushgateway
    password)."""

    def __init__(
        self,
        gateway: str,
        run: str,
        method: str,
        password_file: Path | None = None,
        timeout_s: float = PUSH_TIMEOUT_S,
    ) -> None:
        self.url, self.headers = gateway_url(gateway), auth_headers(password_file)
        self.run, self.method, self.timeout_s = run, method, timeout_s
        self.tidied = False

    def push(self, result: dict) -> bool:
        """Replace the fleet's group with the round `result`; False, and one logged line, when
        the Pushgateway did not take it. The run's first push that the gateway takes also
        deletes the job's other groups."""
        families = round_families(result, self.run, self.method)
        try:
            put_group(self.url, self.headers, JOB, families, self.timeout_s)
        except OSError as exc:  # URLError, HTTPError and connection errors are OSErrors
            log.warning(
                "round %s: Pushgateway %s did not take the round's figures (%s); they are in the "
                "run folder, and the next round's push replaces them",
                result["round"],
                self.url,
                exc,
            )
            return False
        if not self.tidied:
            self.tidied = True
            self.delete_other_groups()
        return True

    def delete_other_groups(self) -> list[dict[str, str]]:
        """Delete every group of the job but the fleet's own (earlier versions pushed one group
        per round); the groups deleted. A gateway that does not answer costs one logged line."""
        try:
            with self._request("GET", "/api/v1/metrics", None, TIDY_TIMEOUT_S) as answer:
                groups = [group["labels"] for group in json.load(answer)["data"]]
            others = [g for g in groups if g.get("job") == JOB and set(g) - {"job", "instance"}]
            for labels in others:
                self._request("DELETE", group_path(labels), None, TIDY_TIMEOUT_S).close()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Pushgateway %s: earlier groups not deleted (%s)", self.url, exc)
            return []
        if others:
            log.info("Pushgateway %s: deleted %d earlier groups of %s", self.url, len(others), JOB)
        return others

    def _request(self, method: str, path: str, body: Iterator[bytes] | None, timeout: float):
        return gateway_request(self.url, self.headers, method, path, body, timeout)


def gateway_url(gateway: str) -> str:
    return gateway if "://" in gateway else f"http://{gateway}"


def auth_headers(password_file: Path | None) -> dict[str, str]:
    """Basic auth for the fleet's one Pushgateway user, when the fleet has its password."""
    if password_file is None or not password_file.is_file():
        return {}
    secret = f"{PUSH_USER}:{password_file.read_text().strip()}".encode()
    return {"Authorization": "Basic " + base64.b64encode(secret).decode()}


def gateway_request(
    url: str,
    headers: dict[str, str],
    method: str,
    path: str,
    body: Iterator[bytes] | None,
    timeout: float,
):
    """One request to the Pushgateway at `url` (an OSError when it does not take it)."""
    headers = {**headers, **({"Content-Type": CONTENT_TYPE} if body is not None else {})}
    request = urllib.request.Request(url + path, body, headers, method=method)
    return urllib.request.urlopen(request, timeout=timeout)


def put_group(
    url: str, headers: dict[str, str], job: str, families: list[Family], timeout: float
) -> None:
    """Replace the group of `job` (its only one) with `families`, the body streamed; an
    OSError when the Pushgateway does not take it."""
    body = (family.text().encode() for family in families)
    gateway_request(url, headers, "PUT", f"/metrics/job/{job}", body, timeout).close()


def push_group(gateway: str, job: str, families: list[Family], password_file: Path | None) -> None:
    """`put_group` to the Pushgateway at `gateway` (host:port) with the fleet's password."""
    put_group(gateway_url(gateway), auth_headers(password_file), job, families, PUSH_TIMEOUT_S)


def group_path(labels: dict[str, str]) -> str:
    """The Pushgateway's URL path of a group, every value base64-encoded (a value may hold '/')."""
    path = f"/metrics/job/{labels['job']}"
    for name, value in labels.items():
        if name != "job":
            path += f"/{name}@base64/{base64.urlsafe_b64encode(value.encode()).decode() or '='}"
    return path
