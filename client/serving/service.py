"""The service itself: the socket's clients, the spool, the log and the tally around one
`predict`, until SIGTERM (then the requests in flight are answered and the files closed).

On the Unix socket each line in is a request, each line out its answer, in order, for any number
of clients at once: `[v, ...]` (one sample) answers `{"class", "label", "confidence",
"probabilities", "version", "round"}`; `[[v, ...], ...]` (a batch) answers the same keys with a
list per key, but no probabilities; a bad line answers `{"error": ...}` and the connection goes on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skip2fleet.client.model import DeviceModel
from skip2fleet.client.serving.follower import ModelFollower, log_line
from skip2fleet.client.serving.predlog import PredictionLog
from skip2fleet.client.serving.requests import parse_samples
from skip2fleet.client.serving.spool import Spool
from skip2fleet.client.serving.tally import Tally
from skip2fleet.shared.errors import DataError, FleetError

MAX_LINE = 1 << 24  # 16 MiB: about 3,000 fan spectra in one batch
SPOOL_POLL_S = 0.1
SNAPSHOT_S = 1.0


@dataclass(frozen=True)
class ServeSettings:
    state_dir: Path
    socket: Path
    spool: Path | None
    keep: bool = True  # spool files answered: to done/ (True) or deleted
    log_max_bytes: int = 10 << 20


class Predictions:
    """One prediction, counted and logged, by whichever model is serving at that moment."""

    def __init__(self, follower: ModelFollower, tally: Tally, log: PredictionLog) -> None:
        self.follower, self.tally, self.log = follower, tally, log

    def model(self) -> DeviceModel:
        model = self.follower.model
        if model is None:
            raise FleetError("no active model yet; it appears after the first round")
        return model

    def run(self, source: str, x: np.ndarray) -> tuple[DeviceModel, np.ndarray]:
        started = time.perf_counter()
        model = self.model()  # read once: the whole request is this model's
        probabilities = model.predict(x)
        labels, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
        version = model.active.version.number if model.active.version else 0
        self.tally.answered(model.classes, labels, confidence, time.perf_counter() - started)
        self.log.append(source, model.classes, labels, confidence, version)
        return model, probabilities


def answer(model: DeviceModel, probabilities: np.ndarray, batch: bool) -> dict:
    labels = probabilities.argmax(axis=1)
    version = model.active.version
    said = {"version": version.number if version else 0, "round": model.round or 0}
    if batch:
        return {
            "class": [model.classes[k] for k in labels],
            "label": labels.tolist(),
            "confidence": np.round(probabilities.max(axis=1), 6).tolist(),
            **said,
        }
    row, k = probabilities[0], int(labels[0])
    return {
        "class": model.classes[k],
        "label": k,
        "confidence": round(float(row[k]), 6),
        "probabilities": {c: round(float(p), 6) for c, p in zip(model.classes, row, strict=True)},
        **said,
    }


def rejection_kind(problem: str) -> str:
    if "values; the model takes" in problem:
        return "width"
    return "values" if "NaN" in problem else "garbage"


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = False  # SIGTERM waits for the requests in flight
    block_on_close = True
    predictions: Predictions

    def __init__(self, path: str) -> None:
        super().__init__(path, _Client)
        self.clients: set[socket.socket] = set()
        self.clients_lock = threading.Lock()

    def drain(self) -> None:
        """Stop taking requests: every client reads its end after the one in flight."""
        self.shutdown()
        with self.clients_lock:
            for connection in self.clients:
                connection.shutdown(socket.SHUT_RD)
        self.server_close()  # waits for the clients' threads


class _Client(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        with server.clients_lock:
            server.clients.add(self.connection)
        try:
            self.answer_lines(server.predictions)
        finally:
            with server.clients_lock:
                server.clients.discard(self.connection)

    def answer_lines(self, predictions: Predictions) -> None:
        number = 0
        while line := self.rfile.readline(MAX_LINE):
            number += 1
            if not line.strip():
                continue
            try:
                model = predictions.model()
                x = parse_samples(line, model.width)
                model, probabilities = predictions.run(f"socket:{number}", x)
                reply = answer(model, probabilities, line.lstrip()[1:].lstrip()[:1] == b"[")
            except DataError as exc:
                predictions.tally.reject(rejection_kind(str(exc)))
                reply = {"error": f"line {number}: {exc}"}
            except FleetError as exc:
                predictions.tally.reject("model")
                reply = {"error": str(exc)}
            try:
                self.wfile.write(json.dumps(reply).encode() + b"\n")
            except OSError:
                return  # the client went away


def listen(path: Path, predictions: Predictions) -> _Server:
    """The Unix socket, readable and writable by the service's user and group only."""
    path.unlink(missing_ok=True)
    try:
        server = _Server(str(path))
    except OSError as exc:
        raise FleetError(f"{path}: cannot listen there ({exc.strerror})") from None
    os.chmod(path, 0o660)
    server.predictions = predictions
    return server


def drain_spool(spool: Spool, predictions: Predictions, stop: threading.Event) -> None:
    while not stop.is_set():
        waiting = spool.waiting()
        predictions.tally.backlog = len(waiting)
        if predictions.follower.model is None or not waiting:
            stop.wait(SPOOL_POLL_S)
            continue
        for path in waiting:
            reason = spool.answer_one(path, lambda where, x: predictions.run(where, x))
            if reason is not None:
                predictions.tally.reject("file")
                log_line(f"rejected {reason}")
            predictions.tally.backlog -= 1
            if stop.is_set():
                return


def run_service(settings: ServeSettings) -> None:
    """Serve until SIGTERM or SIGINT."""
    tally = Tally(settings.state_dir)
    follower = ModelFollower(settings.state_dir, tally, log_line).start()
    log = PredictionLog(settings.state_dir / "predictions.ndjson", settings.log_max_bytes)
    predictions = Predictions(follower, tally, log)
    server = listen(settings.socket, predictions)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    workers = [threading.Thread(target=server.serve_forever, name="socket")]
    if settings.spool is not None:
        spool = Spool(settings.spool, settings.keep)
        workers.append(threading.Thread(target=drain_spool, args=(spool, predictions, stop)))
    for worker in workers:
        worker.start()
    where = f"{settings.socket}" + (f" and {settings.spool}" if settings.spool else "")
    log_line(f"answering on {where}")
    while not stop.wait(SNAPSHOT_S):
        tally.write()
    server.drain()
    for worker in workers:
        worker.join()
    follower.stop()
    tally.write()
    log.close()
    settings.socket.unlink(missing_ok=True)
    log_line("stopped")
