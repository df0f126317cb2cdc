"""`fleet serve` as a sensor process sees it: a real service process, its Unix socket and spool,
its log and the agent's metrics, a round's switch and a rollback while clients keep asking."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from skip2fleet.client.serving.bench import Client
from skip2fleet.client.serving.predlog import PredictionLog
from skip2fleet.client.serving.requests import parse_samples
from skip2fleet.client.store import DeviceStore
from skip2fleet.client.telemetry.agent import DeviceCollector
from skip2fleet.client.telemetry.probes import ThermalZones
from skip2fleet.server.operations.monitoring import write_monitoring
from skip2fleet.shared import model as base_model
from skip2fleet.shared.config import load_config
from skip2fleet.shared.errors import DataError
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.spec import mlp

ROOT = Path(__file__).resolve().parents[1]
WIDTH, CLASSES = 8, ("damaged", "normal", "stopped")


def device_state(root: Path) -> tuple[DeviceStore, list]:
    """A device's state folder with a base and two versions of Skip2-LoRA adapters, the first
    active."""
    rng = np.random.default_rng(0)
    base = base_model.with_classes(base_model.init_model(mlp(WIDTH, 3, 16), rng), CLASSES)
    store = DeviceStore(root)
    digest = store.save_base(base)
    size = layout(get_method("skip2-lora"), base_model.spec_of(base), 2).size
    versions = [
        store.save_version(rng.normal(0, 2, size).astype("f4"), r, digest, "skip2-lora", 2, 90.0)
        for r in (1, 2)
    ]
    store.activate(digest, versions[0], 90.0)
    return store, versions


@pytest.fixture
def service(tmp_path):
    """A running `fleet serve` on a fresh state folder, stopped by its pid at the end."""
    store, versions = device_state(tmp_path / "state")
    process = subprocess.Popen(
        [sys.executable, "-m", "skip2fleet.cli", "serve", "--state-dir", str(store.root),
         "--log-max-mb", "0.05"],
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    sock = store.root / "serve.sock"
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no socket"
            time.sleep(0.05)
        yield store, versions, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def sample(rng: np.random.Generator, n: int | None = None) -> bytes:
    x = rng.normal(size=(n or 1, WIDTH))
    return json.dumps(x[0].tolist() if n is None else x.tolist()).encode()


def test_parse_samples_reads_one_or_a_batch_and_names_what_is_wrong():
    assert parse_samples(b"[1, 2.5, -3]", 3).tolist() == [[1, 2.5, -3]]
    assert parse_samples(b" [[1,2,3], [4,5,6]] ", 3).shape == (2, 3)
    for line, said in [
        (b"[1,2]", "a sample has 2 values; the model takes 3"),
        (b"[[1,2,3],[4,5]]", "a sample has 2 values; the model takes 3"),
        (b"[1,NaN,3]", "NaN or Inf"),
        (b"[1,Infinity,3]", "NaN or Inf"),
        (b'{"x": 1}', "not a JSON array"),
        (b"[1,a,3]", "not a JSON array"),
        (b"[]", "a sample has 0 values"),
    ]:
        with pytest.raises(DataError, match=said):
            parse_samples(line, 3)


def test_the_log_keeps_within_its_cap(tmp_path):
    log = PredictionLog(tmp_path / "p.ndjson", 4000)
    for _ in range(200):
        log.append("socket:1", CLASSES, np.array([0, 2]), np.array([0.9, 0.5]), 3)
    log.close()
    files = [tmp_path / "p.ndjson", tmp_path / "p.ndjson.1"]
    assert sum(f.stat().st_size for f in files) <= 4000
    lines = files[0].read_text().splitlines()
    assert json.loads(lines[-1])["class"] == "stopped" and json.loads(lines[-1])["version"] == 3


def test_the_socket_answers_clients_at_once_and_bad_lines_do_not_end_a_connection(service):
    store, _, _ = service
    rng = np.random.default_rng(1)
    answers = []

    def client() -> None:
        c = Client(store.root / "serve.sock")
        answers.extend(c.ask(sample(rng)) for _ in range(20))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 80 and all(a["class"] in CLASSES for a in answers)
    assert {a["version"] for a in answers} == {1} and set(answers[0]["probabilities"]) == set(
        CLASSES
    )
    c = Client(store.root / "serve.sock")
    assert c.ask(b"[1, 2]")["error"] == f"line 1: a sample has 2 values; the model takes {WIDTH}"
    assert "NaN" in c.ask(b"[" + b",".join([b"NaN"] * WIDTH) + b"]")["error"]
    assert "not a JSON array" in c.ask(b"garbage")["error"]
    batch = c.ask(sample(rng, 5))  # the same connection goes on
    assert len(batch["class"]) == 5 and len(batch["confidence"]) == 5


def test_the_spool_answers_each_file_once_and_rejects_what_is_not_samples(service):
    store, _, _ = service
    spool = store.root / "spool"
    rng = np.random.default_rng(2)
    np.savez(spool / ".writing.npz", x=rng.normal(size=(3, WIDTH)))  # a writer's own: left alone
    with open(spool / "a.part", "wb") as writing:  # written under another name, then renamed
        np.savez(writing, x=rng.normal(size=(7, WIDTH)).astype("f4"))
    os.replace(spool / "a.part", spool / "a.npz")
    (spool / "b.npz").write_bytes(b"PK\x03\x04 half a zip")
    np.savez(spool / "c.npz", x=rng.normal(size=(2, WIDTH + 1)))
    deadline = time.monotonic() + 20
    while len(list((spool / "rejected").glob("*.reason"))) < 2 or (spool / "a.npz").exists():
        assert time.monotonic() < deadline, sorted(p.name for p in spool.rglob("*"))
        time.sleep(0.1)
    assert (spool / "done" / "a.npz").exists() and (spool / ".writing.npz").exists()
    assert "b.npz" in (spool / "rejected" / "b.npz.reason").read_text()
    assert "c.npz" in (spool / "rejected" / "c.npz.reason").read_text()
    logged = [
        json.loads(line) for line in (store.root / "predictions.ndjson").read_text().splitlines()
    ]
    assert sum(e["source"].startswith(str(spool / "a.npz")) for e in logged) == 7


def test_a_rollback_and_a_broken_model_switch_without_a_failed_request(service):
    store, versions, process = service
    rng = np.random.default_rng(3)
    seen, errors, stop = [], [], threading.Event()

    def ask_all_the_time() -> None:
        c = Client(store.root / "serve.sock")
        while not stop.is_set():
            reply = c.ask(sample(rng))
            (errors if "error" in reply else seen).append(reply.get("version", reply))

    asker = threading.Thread(target=ask_all_the_time)
    asker.start()
    try:
        time.sleep(0.3)
        store.activate(versions[1].base_sha256, versions[1], 91.0)  # a round's new adapters
        switched = time.monotonic()
        while seen[-1] != 2:
            assert time.monotonic() - switched < 2, "no switch within 2 s"
            time.sleep(0.02)
        # A version whose arrays are gone: the one before keeps serving.
        (store.root / "versions" / "000001.npy").unlink()
        store.activate(versions[0].base_sha256, versions[0], 90.0)
        time.sleep(1.0)
    finally:
        stop.set()
        asker.join()
    assert errors == [] and seen[-1] == 2
    process.send_signal(signal.SIGTERM)
    _, said = process.communicate(timeout=20)
    assert process.returncode == 0, said
    assert (
        "switched to base" in said and "did not load" in said and said.rstrip().endswith("stopped")
    )
    snapshot = json.loads((store.root / "serve-metrics.json").read_text())
    assert snapshot["switches"] == 1 and snapshot["load_failures"] == 1 and snapshot["version"] == 2


def test_the_agent_exports_what_the_service_did(service, tmp_path):
    store, _, process = service
    c = Client(store.root / "serve.sock")
    rng = np.random.default_rng(4)
    c.ask(sample(rng, 10))
    c.ask(b"[1]")
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=20)
    collector = DeviceCollector(None, ThermalZones(tmp_path), tmp_path, store.root)
    text = collector.exposition().decode()
    predicted = [
        line for line in text.splitlines() if line.startswith("skip2fleet_serve_predictions_total")
    ]
    assert sum(float(line.split()[-1]) for line in predicted) == 10
    assert 'skip2fleet_serve_rejected_total{kind="width"} 1.0' in text
    assert "skip2fleet_serve_version{} 1.0" in text
    assert 'skip2fleet_serve_latency_seconds_bucket{le="+Inf"} 1.0' in text
    assert 'skip2fleet_serve_confidence_bucket{le="+Inf"} 10.0' in text


@pytest.mark.skipif(not shutil.which("promtool"), reason="Debian's prometheus is missing")
def test_the_alarm_rule_fires_for_an_alarm_class_only(tmp_path):
    write_monitoring(load_config(ROOT / "fleet.yaml"), tmp_path)
    folder = tmp_path / "prometheus"
    shutil.copy(ROOT / "tests" / "fixtures" / "alarm_test.yml", folder)
    done = subprocess.run(
        ["promtool", "test", "rules", "alarm_test.yml"], cwd=folder, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_batch_larger_than_the_log_keeps_whole_lines_within_the_cap(tmp_path):
    log = PredictionLog(tmp_path / "p.ndjson", 2000)
    log.append("socket:1", CLASSES, np.zeros(100, int), np.full(100, 0.5), 1)
    log.close()
    text = (tmp_path / "p.ndjson").read_text()
    assert 0 < len(text) <= 1000 and all(json.loads(line) for line in text.splitlines())


def test_a_spool_file_over_the_cap_is_rejected_unread(tmp_path, monkeypatch):
    from skip2fleet.client.serving import spool as spooling

    monkeypatch.setattr(spooling, "MAX_FILE_BYTES", 100)
    spool = spooling.Spool(tmp_path / "spool", keep=True)
    np.savez(spool.folder / "big.npz", x=np.zeros((10, WIDTH)))
    answered = []
    reason = spool.answer_one(spool.folder / "big.npz", lambda where, x: answered.append(x))
    assert answered == [] and "larger than" in reason
    assert (spool.folder / "rejected" / "big.npz").exists()
