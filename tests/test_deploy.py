"""`fleet deploy` over real SSH to fake devices (network namespaces with sshd on a private
bridge), then `fleet run` across them and Prometheus scraping their agents; a device that is
down is named and the others are still deployed. Everything is torn down, also on failure:
the coordinator's services by their pid files, the devices by killing their namespaces."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.server.operations.loopback import free_port, prometheus_query, wait_for
from skip2fleet.shared import model as base_model
from skip2fleet.shared.datasets import Split, TaskOptions, load_task
from skip2fleet.shared.datasets.federated import device_split
from skip2fleet.shared.services import AGENT_MODULE
from tests.fakehosts import (
    COORDINATOR_IP,
    OPERATOR,
    FakeHost,
    fake_hosts,
    ssh_command,
    ssh_keypair,
)
from tests.test_monitoring import firing

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("sshd") or not shutil.which("ansible-playbook"),
    reason="needs root (network namespaces), sshd and ansible (.ci/run installs them)",
)


def test_playbook_syntax():
    playbook = str(ROOT / "ansible" / "site.yml")
    command = ["ansible-playbook", "--syntax-check", "-i", "localhost,", playbook]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def stop_coordinator_services(state: Path) -> None:
    for pidfile in (state / "coordinator" / "run").glob("*.pid"):
        subprocess.run(
            ["start-stop-daemon", "--stop", "--retry", "TERM/30/KILL/5", "--pidfile", str(pidfile)],
            capture_output=True,
        )


SERVICES = (
    "flower-supernode",
    "flower-superexec --runtime-api-address",
    f"{AGENT_MODULE} --config",
    "skip2fleet.cli serve --state-dir",
)

ASK_SERVICE = (
    "import json, socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
    "s.sendall(json.dumps([0.5] * int(sys.argv[2])).encode() + b'\\n'); "
    "print(s.makefile().readline(), end='')"
)


def serving(command: list[str], install: str, width: int = 64) -> dict:
    """What the device's `fleet serve` answers one sample with (its version and round), asked
    through its socket as the service's own user; {} while it has no socket yet."""
    done = subprocess.run(
        [*command, "sudo", "-n", "-u", "skip2fleet-app", f"{install}/venv/bin/python", "-c",
         shlex.quote(ASK_SERVICE), f"{install}/state/serve.sock", str(width)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else {}


def service_processes(host: FakeHost) -> list[tuple[str, str]]:
    """(user, command line) of the device's SuperNode, SuperExec and agent processes."""
    pids = subprocess.run(["ip", "netns", "pids", host.name], capture_output=True, text=True)
    found = []
    for pid in pids.stdout.split():
        with contextlib.suppress(OSError, KeyError):
            proc = Path(f"/proc/{pid}")
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if any(name in command for name in SERVICES):
                found.append((pwd.getpwuid(proc.stat().st_uid).pw_name, command))
    return found


def services_running(host: FakeHost) -> int:
    """How many of the device's SuperNode, SuperExec and agent are running."""
    return len(service_processes(host))


def write_fleet(folder: Path, address: str, devices: list[dict], **sections: dict) -> dict:
    """fleet.yaml in `folder`: a coordinator on `address` with its state in folder/state and free
    ports, these devices and any other sections; returns what it wrote."""
    config = {
        "coordinator": {
            "address": address,
            "port": free_port(),
            "superlink_port": free_port(),
            "state_dir": str(folder / "state"),
            "pushgateway": f"127.0.0.1:{free_port()}",
            "prometheus_port": free_port(),
        },
        **sections,
        "devices": devices,
    }
    (folder / "fleet.yaml").write_text(yaml.safe_dump(config))
    return config


def fake_device(index: int, host: FakeHost, install_root: Path) -> dict:
    return {
        "name": f"pi-{index + 1}",
        "host": host.address,
        "ssh_user": OPERATOR,
        "data": {"partition": index},
        "install_dir": str(install_root / "opt"),
    }


def deploy(path: Path, key: Path, *options: str) -> tuple[int, float, str]:
    started = time.monotonic()
    done = subprocess.run(
        ["fleet", "deploy", "--config", str(path), "--ssh-key", str(key), *options],
        capture_output=True,
        text=True,
    )
    return done.returncode, time.monotonic() - started, done.stdout + done.stderr


def summary(output: str) -> dict[str, list[int]]:
    rows = [
        line.split()
        for line in output.splitlines()
        if line.split()[:1]
        and line.split()[0] in ("coordinator", "pi-1", "pi-2", "pi-3", "pi-4")
        and len(line.split()) == 5
        and line.split()[1].isdigit()
    ]
    return {row[0]: [int(v) for v in row[1:]] for row in rows}


def own_samples(folder: Path, split: Split, classes: tuple[str, ...]) -> Path:
    """`split` as a user's .npz of named samples, in a folder every device user can read."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    np.savez(folder / "samples.npz", x=split.x, y=np.array(classes)[split.y])
    (folder / "samples.npz").chmod(0o644)
    return folder


SPOOL_WRITER = (
    "import numpy as np, os, sys, time\n"
    "for i in range(int(sys.argv[2])):\n"
    "    part = os.path.join(sys.argv[1], f'{i}.part')\n"
    "    with open(part, 'wb') as out:\n"
    "        np.savez(out, x=np.random.default_rng(i).normal(size=(20, 64)).astype('f4'))\n"
    "    os.replace(part, part[:-5] + '.npz')\n"
    "    time.sleep(1)\n"
)


def scheduled(record: Path, outcome: str) -> dict | None:
    """The last scheduled run's record when it has this outcome."""
    with contextlib.suppress(OSError, ValueError):
        said = json.loads(record.read_text())
        return said if said["outcome"] == outcome else None
    return None


def served_count(port: int, device: str) -> float:
    """The predictions Prometheus holds for the device's service, 0 before any."""
    answer = prometheus_query(port, f'sum(skip2fleet_serve_predictions_total{{device="{device}"}})')
    return float(answer[0]["value"][1]) if answer else 0.0


def test_deploy_twice_then_scheduled_rounds_across_the_devices(tmp_path):
    """The coordinator runs two rounds by itself (federation.schedule), then skips, saying why;
    devices read their own folders of samples, predict and serve with their model after the run,
    their predictions reach Prometheus and an alarm class fed through a spool fires the alert."""
    key = ssh_keypair(tmp_path)
    state = tmp_path / "state"
    task = load_task("generated")
    try:
        with fake_hosts(4, key) as hosts:
            os.kill(int((hosts[3].folder / "sshd.pid").read_text()), signal.SIGTERM)  # pi-4 is down
            devices = [fake_device(i, h, h.folder) for i, h in enumerate(hosts)]
            for i, (device, host) in enumerate(zip(devices, hosts, strict=True)):
                tune, _ = device_split("generated", str(i), TaskOptions())
                folder = own_samples(host.folder / "data", tune, task.classes)
                device["data"] = {"path": str(folder)}
            source = own_samples(tmp_path / "source", task.pretrain, task.classes)
            config = write_fleet(
                tmp_path,
                COORDINATOR_IP,
                devices,
                task={"source": str(source), "alert_classes": ["damaged"]},
                training={"epochs": 30, "pretrain_epochs": 5, "accept": "always"},
                federation={
                    "rounds": 2, "min_devices": 3, "round_timeout_s": 90, "schedule": "*:*:0/15"
                },
            )  # fmt: skip
            path = tmp_path / "fleet.yaml"

            code, cold_s, output = deploy(path, key)
            deployed_at = time.time()
            assert code == 1, output  # pi-4 cannot be reached ...
            rows = summary(output)
            assert rows["pi-4"][3] == 1 and "pi-4" in output.split("unreachable")[-1]
            reachable = ("coordinator", "pi-1", "pi-2", "pi-3")
            assert all(rows[h][2] == rows[h][3] == 0 for h in reachable), output

            code, warm_s, output = deploy(path, key)  # ... the others are deployed, and stay so
            rows = summary(output)
            assert all(rows[h][1] == 0 for h in reachable), output
            print(f"cold deploy {cold_s:.1f} s, second deploy {warm_s:.1f} s")

            status = CliRunner().invoke(app, ["status", "--config", str(path)])
            for device in ("pi-1", "pi-2", "pi-3"):
                line = next(line for line in status.output.splitlines() if line.startswith(device))
                assert "online" in line and " up " in line, status.output

            record = state / "schedule.json"  # nobody types `fleet run`: the schedule does
            done = wait_for(lambda: scheduled(record, "completed"), 600, "a scheduled run")
            run = Path(done["folder"])
            print(f"the scheduled run fired {done['started'] - deployed_at:.1f} s after the first "
                  f"deploy and completed its {done['rounds']} rounds")  # fmt: skip
            skipped = wait_for(lambda: scheduled(record, "skipped-no-new-samples"), 60, "a skip")
            assert skipped["why"].startswith("0 of 4 devices have samples"), skipped
            status = CliRunner().invoke(app, ["status", "--config", str(path)])
            assert "schedule: *:*:0/15; last scheduled run " in status.output, status.output
            last = json.loads((run / "rounds" / "002" / "round.json").read_text())
            assert sorted(last["devices"]) == ["pi-1", "pi-2", "pi-3"]
            assert last["missing"] == ["pi-4"]
            assert all(d["acc_after"] > d["acc_before"] for d in last["devices"].values())
            digest = base_model.sha256(base_model.load(run / "base.npz"))

            def predict(device: dict, host: FakeHost) -> list[dict]:
                new = own_samples(host.folder / "new", task.test, task.classes) / "samples.npz"
                install = device["install_dir"]
                predicted = subprocess.run(
                    ssh_command(
                        host,
                        key,
                        *("sudo", "-n", "-u", "skip2fleet-app", f"{install}/venv/bin/fleet"),
                        *("predict", str(new), "--state-dir", f"{install}/state", "--json"),
                    ),
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert predicted.returncode == 0, predicted.stderr
                answers = [json.loads(line) for line in predicted.stdout.splitlines()]
                assert len(answers) == len(task.test), predicted.stderr
                right = sum(
                    task.classes[y] == a["class"] for y, a in zip(task.test.y, answers, strict=True)
                )
                print(f"{device['name']} predicts {len(answers)} new samples: {right} right")
                return answers

            for device, host in zip(devices[:3], hosts, strict=False):
                answers = predict(device, host)
                assert {(a["base_sha256"], a["round"]) for a in answers} == {(digest, 2)}
            finished = time.monotonic()
            for device, host in zip(devices[:3], hosts, strict=False):
                ssh = ssh_command(host, key)
                answered = wait_for(
                    lambda s=ssh, d=device: serving(s, d["install_dir"]), 30, "serve"
                )
                assert answered["round"] == 2 and answered["class"] in task.classes, answered
                print(f"{device['name']}: fleet serve answers with round 2's adapters "
                      f"{time.monotonic() - finished:.1f} s after the predictions")  # fmt: skip
            rolled = CliRunner().invoke(
                app,
                [
                    *("rollback", "--config", str(path), "--device", "pi-1"),
                    *("--ssh-key", str(key), "--round", "1"),
                ],
            )
            assert rolled.exit_code == 0 and "round 1" in rolled.output, rolled.output
            assert {a["round"] for a in predict(devices[0], hosts[0])} == {1}
            rolled_at = time.monotonic()
            ssh, install = ssh_command(hosts[0], key), devices[0]["install_dir"]
            assert wait_for(lambda: serving(ssh, install).get("round") == 1, 10, "the rollback")
            print(f"pi-1: fleet serve follows the rollback in {time.monotonic() - rolled_at:.1f} s")

            port = config["coordinator"]["prometheus_port"]
            up = 'up{job="skip2fleet-agents"} == 1'
            scraped = wait_for(lambda: len(prometheus_query(port, up)) == 3 or None, 30, "agents")
            assert scraped
            skip = 'skip2fleet_schedule_last_outcome{outcome="skipped-no-new-samples"} == 1'
            assert wait_for(lambda: prometheus_query(port, skip), 30, "the skip in Prometheus")
            before = wait_for(lambda: served_count(port, "pi-1"), 30, "pi-1's predictions")
            asked = time.monotonic()
            assert serving(ssh, install).get("round") == 1
            wait_for(lambda: served_count(port, "pi-1") > before, 30, "a new prediction")
            print(f"pi-1: a prediction in Prometheus {time.monotonic() - asked:.1f} s after it "
                  "was made (agents scraped every 5 s)")  # fmt: skip
            spool = f"{install}/state/spool"
            writer = subprocess.Popen(
                [*ssh, "sudo", "-n", "-u", "skip2fleet-app", f"{install}/venv/bin/python", "-c",
                 shlex.quote(SPOOL_WRITER), spool, "120"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                fed = time.monotonic()
                alarm = wait_for(lambda: firing(port, "AlarmClass"), 120, "the alarm")
                assert alarm[0]["labels"]["device"] == "pi-1", alarm
                print(f"pi-1: AlarmClass fired {time.monotonic() - fed:.1f} s after the first "
                      "spool file")  # fmt: skip
            finally:
                writer.kill()
                writer.wait()
            # the Pushgateway is scraped every 2 s: wait until round 2's push has been scraped
            last_round = "skip2fleet_round_number == 2"
            assert wait_for(lambda: prometheus_query(port, last_round), 30, "round 2 in Prometheus")
    finally:
        stop_coordinator_services(state)


def test_a_wrong_key_and_a_full_disk_are_named_and_leave_nothing_running(tmp_path):
    key, wrong = ssh_keypair(tmp_path), ssh_keypair(Path(tempfile.mkdtemp(dir=tmp_path)))
    state = tmp_path / "state"
    # Mounted before the hosts' sshd copy the mount table; where the deploying user can look.
    small = Path(tempfile.mkdtemp(prefix="skip2fleet-small-disk-", dir="/var/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", small], check=True)
    try:
        with fake_hosts(2, key) as hosts:
            devices = [fake_device(0, hosts[0], hosts[0].folder), fake_device(1, hosts[1], small)]
            config = write_fleet(tmp_path, COORDINATOR_IP, devices, federation={"min_devices": 1})
            path = tmp_path / "fleet.yaml"

            code, _, output = deploy(path, wrong)
            assert code == 1, output
            rows = summary(output)
            assert rows["pi-1"][3] == rows["pi-2"][3] == 1, output
            assert "pi-1: " in output and "Permission denied" in output, output

            code, _, output = deploy(path, key, "--limit", "pi-2")
            assert code == 1, output
            assert summary(output)["pi-2"][2] == 1, output
            assert re.search(r"pi-2: only 1\d MB free under .* 600 MB needed", output), output
            assert not (small / "opt").exists()  # nothing installed, nothing started

            code, _, output = deploy(path, key, "--check", "--limit", "pi-1")
            assert code == 0 and "changed" in output, output  # a dry run says what would change
            assert not (hosts[0].folder / "opt").exists() and services_running(hosts[0]) == 0

            code, _, output = deploy(path, key, "--limit", "pi-1")
            assert code == 0, output
            assert services_running(hosts[0]) == len(SERVICES)
            code, _, output = deploy(path, key, "--check", "--limit", "pi-1")
            assert code == 0 and summary(output)["pi-1"][1] == 0, output  # nothing would change
            config["devices"][0]["agent_port"] = 9111  # a new configuration ...
            path.write_text(yaml.safe_dump(config))
            etc = hosts[0].folder / "opt" / "etc"
            shutil.rmtree(etc)
            etc.write_text("in the way")  # ... that cannot be unpacked
            code, _, output = deploy(path, key, "--limit", "pi-1")
            assert code == 1 and "pi-1: Fleet file, CA certificate" in output, output
            assert services_running(hosts[0]) == 0  # not left running on the old one

            # Someone else answers at pi-1's address: its host key is not the one first seen.
            known_hosts = state / "known_hosts"
            assert known_hosts.read_text().strip()  # learnt at the first contact
            other = ssh_keypair(Path(tempfile.mkdtemp(dir=tmp_path)))
            impostor_key = other.with_suffix(".pub").read_text().split()[:2]
            known_hosts.write_text(f"{hosts[0].address} {' '.join(impostor_key)}\n")
            for socket in (state / "ssh").iterdir():  # a later deploy: no shared connection left
                socket.unlink()
            code, _, output = deploy(path, key, "--check", "--limit", "pi-1")
            assert code == 2, output
            assert "pi-1: its SSH host key is not the one recorded" in output, output
            assert f"ssh-keygen -R {hosts[0].address}" in output, output
    finally:
        stop_coordinator_services(state)
        subprocess.run(["umount", "--lazy", small], check=False)
        small.rmdir()


@pytest.mark.skipif(
    not shutil.which("systemd-nspawn") or not shutil.which("debootstrap"),
    reason="needs systemd-nspawn and debootstrap (.ci/run installs them)",
)
def test_a_systemd_device_gets_units_and_fine_tunes(tmp_path):
    from tests.fakehosts import SYSTEMD_SUBNET, SYSTEMD_USER, systemd_host

    key = ssh_keypair(tmp_path)
    state = tmp_path / "state"
    try:
        with systemd_host(tmp_path, key) as host:
            write_fleet(
                tmp_path,
                f"{SYSTEMD_SUBNET}.1",
                [{"name": "pi-sd", "host": host.address, "ssh_user": SYSTEMD_USER}],
                training={"epochs": 30, "pretrain_epochs": 5},
                federation={"rounds": 1, "min_devices": 1, "round_timeout_s": 90},
            )
            path = tmp_path / "fleet.yaml"
            code, _, output = deploy(path, key)
            assert code == 0, output
            units = subprocess.run(
                ssh_command(
                    host,
                    key,
                    *("systemctl", "is-active", "skip2fleet-supernode", "skip2fleet-agent"),
                    "skip2fleet-serve",
                ),
                capture_output=True,
                text=True,
            )
            assert units.stdout.split() == ["active", "active", "active"]
            shown = subprocess.run(
                ssh_command(
                    host,
                    key,
                    "systemctl",
                    "show",
                    "-p",
                    "Restart,KillMode,After",
                    "skip2fleet-supernode",
                ),
                capture_output=True,
                text=True,
            ).stdout
            # restarted whatever its exit code, its whole group with it, after the clock's sync
            assert "Restart=always" in shown and "KillMode=control-group" in shown, shown
            assert "time-sync.target" in shown, shown
            result = CliRunner().invoke(
                app, ["run", "--config", str(path), "--out", str(tmp_path / "run")]
            )
            assert result.exit_code == 0, result.output
    finally:
        stop_coordinator_services(state)


@pytest.mark.skipif(
    not shutil.which("qemu-aarch64-static") or not shutil.which("debootstrap"),
    reason="needs qemu-user-static and debootstrap (.ci/run installs them)",
)
def test_an_emulated_pi_is_deployed_from_its_wheelhouse_and_fine_tunes_beside_x86_devices(
    tmp_path,
):
    """An arm64 Debian bookworm root under qemu user mode (cortex-a53) on the fake devices'
    bridge: deployed as a Pi is, from the aarch64 wheelhouse with no package index (its namespace
    reaches nothing but the bridge), its agent starting where the coordinator's folders do not
    exist, and fine-tuning in the same round as two x86 devices."""
    from tests.emulated_pi import PI_USER, emulated_pi

    key = ssh_keypair(tmp_path)
    state = tmp_path / "state"
    controller_data = tmp_path / "controller-only"  # the task's folder: not on the Pi
    controller_data.mkdir()
    try:
        with fake_hosts(2, key) as hosts, emulated_pi(hosts[0].folder.parent, key) as pi:
            devices = [fake_device(i, h, h.folder) for i, h in enumerate(hosts)]
            devices.append({"name": "pi-arm", "host": pi.address, "ssh_user": PI_USER})
            config = write_fleet(
                tmp_path,
                COORDINATOR_IP,
                devices,
                task={"dataset": "generated", "data_dir": str(controller_data)},
                training={"epochs": 30, "pretrain_epochs": 5},
                federation={"rounds": 1, "min_devices": 3, "round_timeout_s": 600},
            )
            path = tmp_path / "fleet.yaml"
            code, deploy_s, output = deploy(path, key)
            assert code == 0, output
            assert list((state / "wheelhouse").glob("wheelhouse-*-aarch64-py3.11-glibc2.36.tar"))

            def on_pi(*command: str) -> str:
                done = subprocess.run(
                    ssh_command(pi, key, *command), capture_output=True, text=True, timeout=120
                )
                assert done.returncode == 0, done.stderr
                return done.stdout

            on_pi("test", "!", "-e", str(controller_data))  # the task's folder is not there
            own = json.loads(on_pi("cat", "/opt/skip2fleet/etc/device.json"))
            assert own["name"] == "pi-arm" and str(state) not in json.dumps(own)
            # its /proc is the machine's: its own services are those run from its venv
            processes = [
                line
                for line in on_pi("ps", "-eo", "user:16,args").splitlines()
                if "/opt/skip2fleet/venv/" in line
            ]
            owners = {
                name: {line.split()[0] for line in processes if name in line} for name in SERVICES
            }
            assert owners == {
                "flower-supernode": {"skip2fleet"},
                "flower-superexec --runtime-api-address": {"skip2fleet-app"},
                f"{AGENT_MODULE} --config": {"skip2fleet"},
                "skip2fleet.cli serve --state-dir": {"skip2fleet-app"},
            }, processes

            run = tmp_path / "run"
            started = time.monotonic()
            result = CliRunner().invoke(app, ["run", "--config", str(path), "--out", str(run)])
            assert result.exit_code == 0, result.output
            round_s = time.monotonic() - started
            first = json.loads((run / "rounds" / "001" / "round.json").read_text())
            assert sorted(first["devices"]) == ["pi-1", "pi-2", "pi-arm"], first
            arm = first["devices"]["pi-arm"]
            assert arm["acc_after"] > arm["acc_before"], arm

            port = config["coordinator"]["prometheus_port"]
            up = f'up{{job="skip2fleet-agents",instance="{pi.address}:9101"}} == 1'
            assert wait_for(lambda: prometheus_query(port, up), 60, "the Pi's agent scraped")
            ssh = ssh_command(pi, key)
            answered = wait_for(
                lambda: serving(ssh, "/opt/skip2fleet").get("round") == 1, 30, "serve"
            )
            assert answered
            serve_pid = next(
                line.split()[0]
                for line in on_pi("ps", "-eo", "pid,args").splitlines()
                if "/opt/skip2fleet/venv/" in line and "skip2fleet.cli serve" in line
            )  # its /proc is ours: qemu's memory and the emulated Python's together
            status = Path(f"/proc/{serve_pid}/status").read_text().splitlines()
            peak = next(line for line in status if line.startswith("VmHWM")).split()[1]
            print(f"emulated Pi: deploy {deploy_s:.1f} s, one round {round_s:.1f} s, fleet serve "
                  f"answers with round 1, its peak RSS {int(peak) / 1024:.1f} MB")  # fmt: skip
    finally:
        stop_coordinator_services(state)
