"""The front door and the services that outlast a killed process or a wrong clock.

- The door's allowlist is exactly what the pinned Flower's SuperNode sends (read from Flower's
  own client code: a new call in a Flower upgrade fails here before it fails on a fleet).
- The SuperNode watchdog stops a SuperNode that holds no connection to the door, and only it.
- The supervising script (what `fleet deploy` installs where PID 1 is not systemd) restarts a
  command whatever its exit code and takes the command's process group along; nginx's master
  SIGKILLed alone under it comes back serving, and a stop leaves no worker behind.
- A device whose clock is 10 minutes ahead or behind (libfaketime) is refused by Flower; its
  agent and `fleet status` say why, and it trains once its clock is right.
Figures are printed as `DOOR ...` lines (run with `-s`).
"""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import flwr
import jinja2
import pytest
import yaml
from typer.testing import CliRunner

from skip2fleet.cli.fleet import app
from skip2fleet.client.telemetry.clock import door_offset
from skip2fleet.client.watchdog import SuperNodeWatchdog
from skip2fleet.server.operations.certs import credentials_for
from skip2fleet.server.operations.devices import device_settings
from skip2fleet.server.operations.frontdoor import (
    FLEET_CALLS,
    STREAM_MODULE,
    door_note,
    door_trouble,
    nginx_command,
    run_folder,
    worker_connections,
    write_nginx_config,
)
from skip2fleet.server.operations.loopback import (
    free_port,
    loopback_deployment,
    start_frontdoor,
    start_supernode,
    wait_for,
)
from skip2fleet.server.operations.superlink import flower_env
from skip2fleet.shared.config import load_config
from skip2fleet.shared.process import PROCESS_SETTINGS
from skip2fleet.shared.services import AGENT_MODULE

ROOT = Path(__file__).resolve().parents[1]
FLOWER = Path(flwr.__file__).parent / "supernode"
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
needs_nginx = pytest.mark.skipif(
    not shutil.which("nginx") or not STREAM_MODULE.is_file(),
    reason="needs nginx and its stream module (.ci/run installs nginx, libnginx-mod-stream)",
)


def figure(name: str, value: object) -> None:
    print(f"DOOR {name}: {value}")


def flower_supernode_calls() -> set[tuple[str, str]]:
    """(method, path) of every Fleet API call the pinned Flower's SuperNode makes with node
    authentication: the client methods its connection calls, except under `if self_registered`
    (a SuperNode without a key), mapped to their paths in the client."""
    connection = ast.parse((FLOWER / "fleet_http_connection.py").read_text())
    skipped: set[int] = set()
    for node in ast.walk(connection):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "self_registered":
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    used = {
        node.attr
        for node in ast.walk(connection)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "client"
        and id(node) not in skipped
    }
    client = ast.parse((FLOWER / "fleet_http_client.py").read_text())
    paths = {
        function.name: keyword.value.value
        for function in ast.walk(client)
        if isinstance(function, ast.FunctionDef)
        for call in ast.walk(function)
        if isinstance(call, ast.Call)
        for keyword in call.keywords
        if keyword.arg == "path"
    }
    assert used and used <= set(paths), used - set(paths)
    transport = (Path(flwr.__file__).parent / "supercore" / "protobuf" / "client.py").read_text()
    methods = set(re.findall(r'method="([A-Z]+)"', transport))
    assert methods == {"POST"}, methods  # every call is a POST
    return {("POST", paths[name]) for name in used}


def test_the_door_admits_exactly_the_calls_the_pinned_flowers_supernode_makes():
    door = {("POST", f"/v1/fleet/{call}") for call in FLEET_CALLS}
    flower = flower_supernode_calls()
    assert flower - door == set(), f"the pinned Flower uses calls the door refuses: {flower - door}"
    assert door - flower == set(), f"the door admits calls no SuperNode makes: {door - flower}"
    figure("calls admitted", ", ".join(sorted(call for call in FLEET_CALLS)))


def test_door_trouble_counts_the_refusals_of_the_last_minute_in_both_logs(tmp_path):
    fleet = load_config(small_fleet(tmp_path, 1))
    run_dir = run_folder(fleet)
    run_dir.mkdir(parents=True)
    assert door_note(fleet) == ""  # no logs yet: nothing to add to a message
    now = time.time()
    (run_dir / "nginx-access.log").write_text(
        f'{now - 90} 10.0.0.9 "POST /v1/control/list-nodes" 403 0.000\n'  # too old
        f'{now - 30} 10.0.0.9 "POST /v1/control/list-nodes" 403 0.000\n'
        f'{now - 20} 10.0.0.2 "POST /v1/fleet/pull-messages" 200 0.004\n'  # a device at work
        f'{now - 10} 10.0.0.9 "POST /v1/fleet/push-messages" 408 10.001\n'
    )
    (run_dir / "nginx-stream.log").write_text(
        f"{now - 5} 10.0.0.9 stream 503 0.000\n{now - 4} 10.0.0.2 stream 200 61.2\n"
    )
    assert door_trouble(fleet, now=now) == 3
    assert "the front door logged 3 refused or timed-out connections" in door_note(fleet)
    assert door_trouble(fleet, now=now + 120) == 0


def test_worker_connections_grow_with_the_fleet_and_one_address_holds_a_small_share():
    for devices in (3, 100, 1000):
        share = 16 * 4 / worker_connections(devices)
        assert share <= 1 / 16, (devices, share)
    assert worker_connections(1000) > worker_connections(100) > worker_connections(3) >= 1024


@contextlib.contextmanager
def fake_supernode(folder: Path, device: str, door: str, connect: bool):
    """A process whose command line is a SuperNode's (`flower-supernode --superlink DOOR ...
    device='NAME'`) that holds a TCP connection to `door`, or none."""
    script = folder / "flower-supernode"
    script.write_text(
        "import socket, sys, time\n"
        "host, port = sys.argv[2].rsplit(':', 1)\n"
        "held = socket.create_connection((host, int(port))) if sys.argv[-1] == 'yes' else None\n"
        "time.sleep(120)\n"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            str(script),
            *("--superlink", door, "--node-config", f"device='{device}'"),
            "yes" if connect else "no",
        ],
        start_new_session=True,
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_the_watchdog_stops_only_a_supernode_without_a_connection(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    door = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        with (
            fake_supernode(tmp_path, "pi-1", door, connect=True) as working,
            fake_supernode(tmp_path, "pi-2", door, connect=False) as stuck,
        ):
            accepted = listener.accept()[0]
            dogs = {n: SuperNodeWatchdog(n, door, bound_s=1.0) for n in ("pi-1", "pi-2")}
            assert dogs["pi-1"].supernodes() == [working.pid]
            assert dogs["pi-2"].supernodes() == [stuck.pid]
            assert dogs["pi-1"].connected(working.pid) and not dogs["pi-2"].connected(stuck.pid)
            assert dogs["pi-2"].check() == [] and dogs["pi-1"].check() == []  # first sight
            time.sleep(1.5)
            assert dogs["pi-1"].check() == []
            assert dogs["pi-2"].check() == [stuck.pid]
            assert stuck.wait(timeout=15) == -signal.SIGTERM and working.poll() is None
            assert dogs["pi-2"].restarts == 1 and dogs["pi-1"].restarts == 0
            accepted.close()
    finally:
        listener.close()


def supervisor(folder: Path, name: str, argv: list[str]) -> Path:
    """The supervising script `fleet deploy` installs for `argv` (the service role's template,
    rendered as Ansible renders it)."""
    template = ROOT / "ansible" / "roles" / "service" / "templates" / "supervise.sh.j2"
    env = jinja2.Environment(keep_trailing_newline=True)
    env.filters["quote"] = lambda value: "'" + str(value).replace("'", "'\"'\"'") + "'"
    text = env.from_string(template.read_text()).render(
        ansible_managed="test",
        svc_name=name,
        svc_argv=argv,
        svc_dir=str(folder),
        svc_path=os.environ["PATH"],
        process_env=PROCESS_SETTINGS,
    )
    script = folder / f"{name}.run"
    script.write_text(text)
    return script


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            pid = int(entry.name) if entry.name.isdigit() else 0
            if pid and os.getpgid(pid) == pgid and alive(pid):
                found.append(pid)
    return found


def listen_once_free(port: int, within_s: float) -> socket.socket:
    """Listen on a loopback port the killed front door held: its workers and the sockets they
    accepted may keep the address for a moment after the master is reaped (one CI run failed so)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return socket.create_server(("127.0.0.1", port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_the_supervisor_restarts_whatever_the_exit_code_and_kills_what_is_left(tmp_path):
    """A command that leaves a child behind and exits 0: restarted, its child killed."""
    command = ["/bin/sh", "-c", f"sleep 300 & echo $! >> {tmp_path}/children; exit 0"]
    script = supervisor(tmp_path, "exits-zero", command)
    runner = subprocess.Popen(["/bin/sh", str(script)], start_new_session=True)
    try:
        wait_for(
            lambda: (tmp_path / "exits-zero.log").read_text().count("exited with 0") >= 2,
            30,
            "two restarts",
        )
        children = [int(p) for p in (tmp_path / "children").read_text().split()]
        assert len(children) >= 2
        assert not [pid for pid in children[:-1] if alive(pid)]  # killed with its command
        log = (tmp_path / "exits-zero.log").read_text()
        assert "restarting in 2 s" in log and "restarting in 4 s" in log, log  # back-off
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGKILL)
    children = [int(p) for p in (tmp_path / "children").read_text().split()]
    assert not [pid for pid in children if alive(pid)]  # a stop leaves nothing behind


def door_answers(door: str, ca: Path) -> bool:
    try:
        door_offset(door, str(ca), timeout=2)
        return True
    except (OSError, ValueError):
        return False


def small_fleet(folder: Path, devices: int, **sections) -> Path:
    config = {
        "coordinator": {
            "address": "127.0.0.1",
            "port": free_port(),
            "superlink_port": free_port(),
            "state_dir": str(folder / "state"),
            "tls": True,
        },
        **sections,
        "devices": [
            {"name": f"pi-{i + 1}", "data": {"partition": i}, "agent_port": free_port()}
            for i in range(devices)
        ],
    }
    (folder / "fleet.yaml").write_text(yaml.safe_dump(config))
    return folder / "fleet.yaml"


@needs_nginx
def test_nginx_master_killed_alone_comes_back_serving_and_a_stop_leaves_no_worker(tmp_path):
    fleet = load_config(small_fleet(tmp_path, 1))
    creds = credentials_for(fleet)
    run_dir = run_folder(fleet)
    run_dir.mkdir(parents=True)
    config = write_nginx_config(fleet, creds, tmp_path / "frontdoor")
    script = supervisor(run_dir, "skip2fleet-frontdoor", nginx_command(fleet, config))
    door = f"127.0.0.1:{fleet.coordinator.port}"
    runner = subprocess.Popen(["/bin/sh", str(script)], start_new_session=True)
    group = None
    try:
        wait_for(lambda: door_answers(door, creds.ca_cert), 30, "the front door")
        master = int((run_dir / "nginx.pid").read_text())
        group = os.getpgid(master)
        workers = [pid for pid in group_members(group) if pid != master]
        assert workers and group == master  # nginx leads its own group under the supervisor
        os.kill(master, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(
            lambda: door_answers(door, creds.ca_cert) and _new_master(run_dir, master),
            30,
            "a new master",
        )
        recovered_s = time.monotonic() - killed
        assert recovered_s <= 15
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # the old worker too
        figure(
            "nginx master SIGKILLed alone: seconds until the door serves again",
            f"{recovered_s:.1f}",
        )
        group = int((run_dir / "nginx.pid").read_text())
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
    assert group is not None and group_members(group) == []  # stop leaves nothing behind


def _new_master(run_dir: Path, old: int) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return int((run_dir / "nginx.pid").read_text()) != old
    return False


@pytest.fixture(scope="module")
def clock_fleet(tmp_path_factory):
    """A loopback deployment (SuperLink, front door, pi-1 and pi-2) for the clock cases; pi-3's
    SuperNode and agent are started by each case, under libfaketime."""
    if not LIBFAKETIME.is_file() or not shutil.which("nginx"):
        pytest.skip("needs libfaketime and nginx (.ci/run installs faketime, nginx)")
    root = tmp_path_factory.mktemp("clock")
    path = small_fleet(
        root,
        3,
        training={"epochs": 5, "pretrain_epochs": 5},
        federation={"rounds": 1, "min_devices": 3, "round_timeout_s": 60},
    )
    fleet = load_config(path)
    with loopback_deployment(fleet, root, offline=["pi-3"]) as processes:
        yield fleet, path, processes, root


@pytest.mark.parametrize("minutes", [10, -10])
def test_a_device_with_a_wrong_clock_says_so_and_trains_once_it_is_right(clock_fleet, minutes):
    fleet, path, processes, root = clock_fleet
    device = fleet.devices[2]
    creds = credentials_for(fleet)
    own = root / f"device-{minutes}.json"
    settings = device_settings(fleet, device, root / "devices" / "pi-3", "127.0.0.1", creds.ca_cert)
    own.write_text(settings.text())
    wrong = {
        **flower_env(fleet),
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": f"{minutes:+d}m",
    }
    tag = f"{minutes:+d}".replace("+", "plus").replace("-", "minus")

    def start(name: str, env: dict) -> None:
        processes.start(
            f"agent-{name}", [sys.executable, "-m", AGENT_MODULE, "--config", str(own)], env
        )
        start_supernode(processes, fleet, root, "pi-3", f"pi-3-{name}", env)

    def stop(name: str) -> None:
        for process in (processes.started[f"agent-{name}"], processes.started[f"pi-3-{name}"]):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)

    start(f"wrong-{tag}", wrong)
    node = processes.started[f"pi-3-wrong-{tag}"]
    began = time.monotonic()
    code = node.wait(timeout=120)  # Flower refuses its signed requests; it leaves by itself
    figure(
        f"clock {minutes:+d} min: SuperNode exit code, seconds",
        f"{code}, {time.monotonic() - began:.0f}",
    )
    said = wait_for(lambda: _status_of(path, "pi-3"), 60, "pi-3's clock in fleet status")
    expected = f"clock 10 min {'ahead' if minutes > 0 else 'behind'}"
    assert expected in said, said
    figure(f"clock {minutes:+d} min: fleet status", said)
    stop(f"wrong-{tag}")

    fixed = time.monotonic()  # the clock is right: the service starts the SuperNode again
    start(f"right-{tag}", flower_env(fleet))
    try:
        run = root / f"run-{tag}"
        result = CliRunner().invoke(app, ["run", "--config", str(path), "--out", str(run)])
        assert result.exit_code == 0, result.output
        trained = json.loads((run / "rounds" / "001" / "round.json").read_text())
        assert sorted(trained["devices"]) == ["pi-1", "pi-2", "pi-3"], trained
        figure(
            f"clock {minutes:+d} min: seconds from the right clock to trained",
            f"{time.monotonic() - fixed:.0f}",
        )
        assert "clock" not in _status_of(path, "pi-3", any_line=True)
    finally:
        stop(f"right-{tag}")


def _status_of(path: Path, device: str, any_line: bool = False) -> str | None:
    output = CliRunner().invoke(app, ["status", "--config", str(path)]).output
    line = next((line for line in output.splitlines() if line.startswith(device)), "")
    return line if any_line or "clock" in line else None


@needs_nginx
def test_a_supernode_stuck_after_a_tls_error_is_restarted_by_the_watchdog_and_trains(tmp_path):
    """The front door replaced by a listener that closes every connection mid-handshake: Flower's
    SuperNodes give up ("SSL/TLS handshake error detected") and hang with no connection. Each
    device's watchdog (bound 10 s here, 60 s on a device) stops its SuperNode; the test starts it
    again as its service would, and both devices train in the next round."""
    path = small_fleet(
        tmp_path,
        2,
        training={"epochs": 5, "pretrain_epochs": 5},
        federation={"rounds": 1, "min_devices": 2, "round_timeout_s": 60},
    )
    fleet = load_config(path)
    door = f"127.0.0.1:{fleet.coordinator.port}"
    names = [d.name for d in fleet.devices]
    dogs = {name: SuperNodeWatchdog(name, door, bound_s=10) for name in names}
    with loopback_deployment(fleet, tmp_path) as processes:
        # both at work (activated: "SuperNode ID: ..."), each holding its connection
        wait_for(lambda: all("SuperNode ID" in processes.log(n) for n in names), 90, "SuperNodes")
        wait_for(
            lambda: all(dog.connected(dog.supernodes()[0]) for dog in dogs.values()), 60, "links"
        )
        os.killpg(processes.started["frontdoor"].pid, signal.SIGKILL)
        processes.started["frontdoor"].wait()
        gave_up = "SSL/TLS handshake error"
        with listen_once_free(fleet.coordinator.port, within_s=30) as closer:
            closer.settimeout(0.2)  # read each ClientHello, then close: an EOF mid-handshake
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(
                gave_up in processes.log(name) for name in names
            ):
                with contextlib.suppress(TimeoutError):
                    connection = closer.accept()[0]
                    with connection:
                        connection.settimeout(1)
                        with contextlib.suppress(OSError):
                            connection.recv(4096)
        start_frontdoor(processes, fleet, tmp_path / "frontdoor", "frontdoor-2")
        door_back = time.monotonic()
        # alive, but going nowhere
        assert all(processes.started[name].poll() is None for name in names)
        assert all(gave_up in processes.log(name) for name in names)
        restarts = dict.fromkeys(names, 0)
        current = {name: name for name in names}  # the process name of each device's SuperNode
        stopped, run, follower = set(), tmp_path / "run", None

        def activated(name: str) -> bool:  # the SuperLink took it back ("SuperNode ID: ...")
            node = processes.started[current[name]]
            return node.poll() is None and "SuperNode ID" in processes.log(current[name])

        while follower is None or follower.poll() is None:
            assert time.monotonic() - door_back < 240, processes.log(current[names[0]])[-2000:]
            for name, dog in dogs.items():
                stopped.update(name for _ in dog.check())
                if processes.started[current[name]].poll() is not None:  # its service restarts it
                    restarts[name] += 1
                    current[name] = f"{name}-{restarts[name]}"
                    start_supernode(processes, fleet, tmp_path, name, current[name])
            if follower is None and stopped == set(names) and all(map(activated, names)):
                command = [sys.executable, "-m", "skip2fleet.cli", "run", "--config", str(path)]
                follower = processes.start("run", [*command, "--out", str(run)], flower_env(fleet))
            time.sleep(1)
        assert follower.returncode == 0, processes.log("run")[-2000:]
        trained = json.loads((run / "rounds" / "001" / "round.json").read_text())
        assert sorted(trained["devices"]) == names, trained
        back_s = time.monotonic() - door_back
        figure("stuck SuperNodes: seconds from the door's return to both trained", f"{back_s:.0f}")
