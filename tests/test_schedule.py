"""Rounds by themselves: what a device has not trained on, the fleet's run lock, systemd's calendar,
and a scheduled run that is skipped and says why, asked of real agents and pushed to a real
Pushgateway. (A scheduled run that fires and completes: tests/test_deploy.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import yaml

from skip2fleet.client.untrained import TRAINED_DATA, record_trained, seen_files, untrained_samples
from skip2fleet.server import options as opt
from skip2fleet.server.federation.runlock import RunLocked, fleet_run_lock
from skip2fleet.server.operations.loopback import (
    Processes,
    free_port,
    start_pushgateway,
    wait_for,
)
from skip2fleet.server.operations.schedule import (
    last_outcome,
    next_elapse,
    prune,
    scheduled_run,
)
from skip2fleet.server.operations.status import agent_figures, schedule_line
from skip2fleet.shared.config import FleetConfig, as_yaml_dict, load_config
from skip2fleet.shared.errors import FleetError

needs_systemd_analyze = pytest.mark.skipif(
    not shutil.which("systemd-analyze"), reason="systemd-analyze reads the calendar syntax"
)


def samples_file(folder, name: str, rows: int) -> None:
    if name.endswith(".csv"):
        lines = ["a,b,label", *(f"{i},{i},normal" for i in range(rows))]
        (folder / name).write_text("\n".join(lines) + "\n")
    else:
        np.savez(folder / name, x=np.zeros((rows, 9, 16), "f4"), y=np.zeros(rows, int))


def fleet_in(state: Path) -> FleetConfig:
    """The example fleet with its state folder at `state`."""
    fleet = opt.resolve_fleet(None, 2, 1, "generated", None, None)
    return replace(fleet, coordinator=replace(fleet.coordinator, state_dir=str(state)))


def test_a_device_counts_the_samples_of_files_no_round_trained_on(tmp_path):
    state, folder = tmp_path / "state", tmp_path / "samples"
    state.mkdir()
    folder.mkdir()
    samples_file(folder, "a.npz", 37)
    samples_file(folder, "b.csv", 11)
    assert untrained_samples(state, folder) == 48  # never trained: everything is new
    record_trained(state, seen_files(folder))
    assert untrained_samples(state, folder) == 0
    samples_file(folder, "c.npz", 5)  # a new file
    assert untrained_samples(state, folder) == 5
    time.sleep(0.01)
    samples_file(folder, "b.csv", 12)  # a changed one counts whole
    assert untrained_samples(state, folder) == 17
    assert untrained_samples(state, folder / "c.npz") == 5  # a single file as the folder
    (state / TRAINED_DATA).write_text("garbage")
    assert untrained_samples(state, folder) == 37 + 12 + 5  # an unreadable record: none known


def test_a_device_on_a_built_in_partition_knows_only_whether_it_trained(tmp_path):
    assert untrained_samples(tmp_path, None) is None
    record_trained(tmp_path, seen_files(None))
    assert untrained_samples(tmp_path, None) == 0


def test_the_run_lock_keeps_a_second_run_out_and_names_the_first(tmp_path):
    fleet = fleet_in(tmp_path)
    taken = r"fleet run --out runs/a \(pid \d+\) is running"
    with (
        fleet_run_lock(fleet, "fleet run --out runs/a"),
        pytest.raises(RunLocked, match=taken),
        fleet_run_lock(fleet, "a scheduled run"),
    ):
        pass
    with fleet_run_lock(fleet, "a scheduled run"):  # released with its holder
        pass


@needs_systemd_analyze
def test_the_next_elapse_is_systemds_and_a_bad_expression_is_named():
    when = next_elapse("*:0/30")
    assert when.minute in (0, 30) and when.second == 0
    assert 0 < (when - datetime.now(UTC)).total_seconds() <= 30 * 60
    with pytest.raises(FleetError, match="'every tuesday' is not a systemd calendar expression"):
        next_elapse("every tuesday")


@needs_systemd_analyze
@pytest.mark.skipif(not shutil.which("prometheus-pushgateway"), reason="needs the Pushgateway")
def test_a_scheduled_run_with_too_few_fresh_devices_or_a_run_going_is_skipped_and_says_why(
    tmp_path,
):
    gateway = free_port()
    data = as_yaml_dict(opt.resolve_fleet(None, 3, 1, "generated", None, None))
    data["coordinator"].update(
        state_dir=str(tmp_path / "state"), pushgateway=f"127.0.0.1:{gateway}"
    )
    data["federation"].update(min_devices=2, schedule="*:0/30")
    for device in data["devices"]:
        folder = tmp_path / "samples" / device["name"]
        folder.mkdir(parents=True)
        samples_file(folder, "first.npz", 30)
        device.update(host="127.0.0.1", agent_port=free_port(), data={"path": str(folder)})
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    fleet = load_config(path)
    trained, fresh, _ = fleet.devices  # the third's agent never starts
    record_trained(tmp_path / "run" / trained.name, seen_files(tmp_path / "samples" / trained.name))
    processes = Processes(tmp_path / "logs")
    try:
        start_pushgateway(processes, gateway)
        for device in (trained, fresh):
            processes.start(
                f"agent-{device.name}",
                ["fleet", "agent", "--config", str(path), "--device", device.name,
                 "--address", "127.0.0.1", "--state-dir", str(tmp_path / "run" / device.name)],
                dict(os.environ),
            )  # fmt: skip
        wait_for(lambda: agent_figures(trained) and agent_figures(fresh), 30, "the agents")
        assert agent_figures(trained)["skip2fleet_device_untrained_samples"] == 0
        assert agent_figures(fresh)["skip2fleet_device_untrained_samples"] == 30

        skipped = scheduled_run(fleet)
        assert skipped.outcome == "skipped-no-new-samples", skipped
        assert skipped.why == (
            "1 of 3 devices have samples they have not trained on (1 did not answer); "
            "min_devices is 2"
        )
        assert last_outcome(fleet) == skipped
        pushed = wait_for(lambda: _gateway_metrics(gateway), 10, "the push")
        assert 'job="skip2fleet-schedule",outcome="skipped-no-new-samples"} 1' in pushed
        assert _value(pushed, 'outcome="completed"') == 0
        assert _value(pushed, "skip2fleet_schedule_devices_with_new_samples{") == 1

        with fleet_run_lock(fleet, "fleet run --out runs/by-hand"):
            overlap = scheduled_run(fleet)
        assert overlap.outcome == "skipped-overlap"
        assert "fleet run --out runs/by-hand" in overlap.why
        line = schedule_line(fleet)
        assert (
            line.startswith("schedule: *:0/30; last scheduled run ") and "skipped-overlap" in line
        )
        assert re.search(r"\); next \d{4}-\d\d-\d\d \d\d:(00|30):00 UTC$", line), line
    finally:
        processes.stop_all()


def _gateway_metrics(port: int) -> str | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return text if "skip2fleet_schedule_last_outcome" in text else None


def _value(text: str, where: str) -> float:
    line = next(line for line in text.splitlines() if where in line and not line.startswith("#"))
    return float(line.split()[-1])


def test_the_outcome_record_is_plain_json(tmp_path):
    """`fleet status` and people read it."""
    fleet = fleet_in(tmp_path)
    assert last_outcome(fleet) is None
    (tmp_path / "schedule.json").write_text(json.dumps({"outcome": "completed"}))
    assert last_outcome(fleet) is None  # a record missing fields is no outcome


@needs_systemd_analyze
@pytest.mark.skipif(not shutil.which("ansible"), reason="needs ansible (the deploy extra)")
def test_the_coordinators_timer_and_its_unit_as_deployed_pass_systemd_analyze_verify(tmp_path):
    """The systemd side, where the tests' coordinator (PID 1 not systemd) cannot run it: Ansible
    renders both files as `fleet deploy` does, and systemd checks them."""
    templates = Path(__file__).resolve().parents[1] / "ansible/roles/coordinator/templates"
    variables = {
        "fleet_cli": f"{sys.executable} -m skip2fleet.cli",
        "fleet_file": str(tmp_path / "fleet.yaml"),
        "process_env": {"FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"},
        "schedule": "*-*-* 06:00",
    }
    units = [
        tmp_path / name for name in ("skip2fleet-schedule.timer", "skip2fleet-schedule.service")
    ]
    for unit in units:
        subprocess.run(
            ["ansible", "localhost", "-c", "local", "-m", "ansible.builtin.template",
             "-a", f"src={templates / unit.name}.j2 dest={unit}", "-e", json.dumps(variables)],
            check=True, capture_output=True, env=os.environ | {"ANSIBLE_LOCALHOST_WARNING": "0"},
        )  # fmt: skip
    assert "OnCalendar=*-*-* 06:00" in units[0].read_text()
    assert " schedule run --config " in units[1].read_text()
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stderr


def test_only_the_newest_scheduled_runs_folders_are_kept(tmp_path):
    stamps = [f"scheduled-202612{day:02d}-060000" for day in range(1, 8)]
    for stamp in stamps:
        (tmp_path / stamp).mkdir()
        (tmp_path / stamp / "base.npz").write_bytes(b"x")
    (tmp_path / "run-by-hand").mkdir()  # not the schedule's: left alone
    deleted = prune(tmp_path, keep=3)
    assert [p.name for p in deleted] == stamps[:4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-by-hand", *stamps[4:]]
