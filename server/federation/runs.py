"""A run folder: everything a federated run leaves behind, written as each round completes.

    fleet.yaml            the fleet as it was when the run started
    nodes.json            device name -> Flower node id, as the coordinator registered the keys
                          (deployments only: the ServerApp trusts a reply's node id, not its words)
    base.npz              the base model every device fine-tunes
    run.lock              held (flock) by the ServerApp writing the folder; the OS drops it
                          when that process dies, so a crashed run never blocks a resume
    failure.txt           why the run stopped early (removed when a resume starts)
    rounds/NNN/round.json the round's figures: per device, refused replies, missing devices
    rounds/NNN/received.npz   each device's packed adapters as it sent them, one member each
    rounds/NNN/outgoing.npz   what each device starts the next round from (when the fleet
                          aggregates): each distinct array once (fedavg's mean is one for the
                          fleet), and which device starts from which (OUTGOING_INDEX, JSON)
    rounds/NNN/manifest.json  sha256 of every other file of the round, written with it

A round is four files whatever the fleet's size (earlier versions wrote two per device; their
`outgoing/` folders are still read).

A round's folder appears whole (written aside, fsynced, then renamed), so the last complete round
is the highest-numbered folder, and `--resume` continues after it once every completed round
matches its manifest. A save that fails (a full disk) names the file and leaves no staging folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml

from skip2fleet.shared import model as base_model
from skip2fleet.shared.config import FleetConfig, load_config, parse_config
from skip2fleet.shared.errors import FleetError

MANIFEST = "manifest.json"
RECEIVED, OUTGOING = "received.npz", "outgoing.npz"
OUTGOING_INDEX = "by-device"  # outgoing.npz's member: {device: member} as JSON bytes


class RunFolder:
    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser().resolve()

    @classmethod
    def create(cls, path: Path, config_yaml: dict, base: base_model.Model) -> RunFolder:
        folder = cls(path)
        if (folder.path / "fleet.yaml").exists():
            raise FleetError(f"{folder.path}: a run folder already exists here; use --resume")
        folder.path.mkdir(parents=True, exist_ok=True)
        base_model.save(base, folder.path / "base.npz")
        (folder.path / "fleet.yaml").write_text(yaml.safe_dump(config_yaml, sort_keys=False))
        return folder

    def config(self) -> FleetConfig:
        path = self.path / "fleet.yaml"
        if not path.is_file():
            raise FleetError(f"{self.path}: not a run folder (no fleet.yaml)")
        return load_config(path)

    def extend(self, rounds: int | None) -> RunFolder:
        """Set the run's total rounds (to continue it further); None keeps them."""
        config = self.config()
        if rounds is not None:
            data = yaml.safe_load((self.path / "fleet.yaml").read_text())
            data["federation"]["rounds"] = rounds
            parse_config(data, str(self.path / "fleet.yaml"))
            (self.path / "fleet.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        elif self.completed_rounds()[-1:] == [config.federation.rounds]:
            raise FleetError(
                f"{self.path}: all {config.federation.rounds} rounds are done; "
                "pass --rounds to go further"
            )
        return self

    def resume(self, rounds: int | None) -> RunFolder:
        """Ready the folder to continue: refused while its ServerApp runs or when a completed
        round does not match its manifest (named; nothing is submitted), then `extend`."""
        holder = self.holder()
        if holder is not None:
            raise self._active(holder)
        self.verify()
        self.extend(rounds).clear_failure()
        return self

    def record_failure(self, reason: str) -> None:
        """Why the run stopped early, for `fleet run` to report (the ServerApp's log is remote);
        on a full disk even this may fail, and the reason is left to Flower's run status."""
        with contextlib.suppress(OSError):
            (self.path / "failure.txt").write_text(reason + "\n")

    def clear_failure(self) -> None:
        (self.path / "failure.txt").unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process; a second writer is refused, naming the holder."""
        with (self.path / "run.lock").open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                raise self._active(handle.read().strip()) from None
            handle.truncate(0)
            handle.write(f"pid {os.getpid()}\n")
            handle.flush()
            yield

    def holder(self) -> str | None:
        """Who holds the folder ("pid N") while a ServerApp writes it, else None."""
        path = self.path / "run.lock"
        if not path.is_file():
            return None
        with path.open() as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or "another process"
        return None

    def _active(self, holder: str) -> FleetError:
        return FleetError(
            f"{self.path}: its run is still active ({holder or 'another process'} holds "
            "run.lock); wait for it to end or stop it with `flwr stop`"
        )

    def verify(self) -> None:
        """Every completed round's files against its manifest; the first bad file is named."""
        for number in self.completed_rounds():
            folder = self.path / "rounds" / f"{number:03d}"
            try:
                manifest = json.loads((folder / MANIFEST).read_text())
            except (OSError, ValueError) as exc:
                raise FleetError(f"{folder / MANIFEST}: unreadable ({exc})") from None
            for name, digest in manifest.items():
                path = folder / name
                try:
                    actual = hashlib.sha256(path.read_bytes()).hexdigest()
                except OSError as exc:
                    raise FleetError(f"{path}: {exc.strerror or exc}") from None
                if actual != digest:
                    raise FleetError(f"{path}: corrupt (its sha256 differs from {MANIFEST})")

    def failure(self) -> str | None:
        path = self.path / "failure.txt"
        return path.read_text().strip() if path.is_file() else None

    def save_node_registry(self, registry: dict[str, int]) -> None:
        (self.path / "nodes.json").write_text(json.dumps(registry, indent=2) + "\n")

    def node_registry(self) -> dict[int, str]:
        """Node id -> device name, or empty in a simulation (no keys, nothing registered)."""
        path = self.path / "nodes.json"
        registry = json.loads(path.read_text()) if path.is_file() else {}
        return {int(node): name for name, node in registry.items()}

    def base(self) -> base_model.Model:
        return base_model.load(self.path / "base.npz")

    def completed_rounds(self) -> list[int]:
        rounds = self.path / "rounds"
        return (
            sorted(int(p.name) for p in rounds.iterdir() if p.name.isdigit())
            if rounds.is_dir()
            else []
        )

    def round_result(self, number: int) -> dict:
        return json.loads((self.path / "rounds" / f"{number:03d}" / "round.json").read_text())

    def outgoing(self, number: int) -> dict[str, np.ndarray]:
        """What round `number` left for each device to start the next round from (devices that
        start from the same array share one, read-only)."""
        folder = self.path / "rounds" / f"{number:03d}"
        if (folder / "outgoing").is_dir():  # written by an earlier version
            return {p.stem: np.load(p) for p in sorted((folder / "outgoing").glob("*.npy"))}
        if not (folder / OUTGOING).is_file():
            return {}
        with np.load(folder / OUTGOING) as archive:
            members = json.loads(archive[OUTGOING_INDEX].tobytes())
            arrays = {member: archive[member] for member in set(members.values())}
        for array in arrays.values():
            array.flags.writeable = False  # shared by devices: nothing may change it in place
        return {device: arrays[member] for device, member in members.items()}

    def received(self, number: int) -> dict[str, np.ndarray]:
        """Each device's adapters of round `number`, as it sent them."""
        with np.load(self.path / "rounds" / f"{number:03d}" / RECEIVED) as archive:
            return {device: archive[device] for device in archive.files}

    def save_round(
        self,
        number: int,
        result: dict,
        received: dict[str, np.ndarray],
        outgoing: dict[str, np.ndarray],
    ) -> None:
        """Write the round aside with its manifest, then rename it into place."""
        files = {RECEIVED: received, "round.json": (json.dumps(result, indent=2) + "\n").encode()}
        if outgoing:
            files[OUTGOING] = _distinct(outgoing)
        rounds = self.path / "rounds"
        staging = None
        try:
            rounds.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=rounds, prefix=f".{number:03d}-"))
            manifest = {name: _write_synced(staging / name, data) for name, data in files.items()}
            _write_synced(staging / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
            final = rounds / f"{number:03d}"
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        except OSError as exc:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            where = exc.filename or staging or rounds
            raise FleetError(
                f"round {number} not saved: {where}: {exc.strerror or exc}; "
                f"rounds up to {number - 1} are intact"
            ) from None


def _distinct(outgoing: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """outgoing.npz's members: each distinct array once, and the index of who starts from which."""
    members: dict[int, str] = {}
    arrays: dict[str, np.ndarray] = {}
    for theta in outgoing.values():
        if id(theta) not in members:
            members[id(theta)] = f"theta-{len(members)}"
            arrays[members[id(theta)]] = theta
    index = json.dumps({device: members[id(theta)] for device, theta in outgoing.items()})
    return arrays | {OUTGOING_INDEX: np.frombuffer(index.encode(), np.uint8)}


class _Hashing(io.RawIOBase):
    """A file that hashes what is written through it (zipfile writes an .npz in pieces)."""

    def __init__(self, handle) -> None:
        self.handle, self.digest = handle, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)


def _write_synced(path: Path, data: bytes | dict[str, np.ndarray]) -> str:
    """Write (bytes, or arrays as an uncompressed .npz) and fsync, so a full disk fails here with
    its errno and the file's name (NumPy's own writer reports only "N requested and M written");
    the sha256 of what was written."""
    try:
        with path.open("wb") as handle:
            hashing = _Hashing(handle)
            if isinstance(data, dict):
                np.savez(hashing, **data)
            else:
                hashing.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise
    return hashing.digest.hexdigest()
