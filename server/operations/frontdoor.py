"""The coordinator's front door: nginx in front of a SuperLink that listens on loopback only.

Flower serves the Fleet API (what SuperNodes use), the Control API (`flwr run`, `stop`, `log`,
`supernode register`, ... with no authentication in open-source Flower), the Runtime API and
FastAPI's `/docs` on one port. So the SuperLink binds 127.0.0.1, and nginx admits only what a
SuperNode with a registered key sends:

- **an allowlist**: exactly the calls in `FLEET_CALLS` (the pinned Flower's SuperNode client,
  `tests/test_frontdoor.py` checks it against Flower's code), matched byte for byte on the raw
  request line (method and URI), so encoded `?`, `#` or `/`, a query, a trailing slash or a
  `..` never reach the SuperLink; and only with a node key the coordinator registered (the
  request's `flwr-public-key` header against the fleet's keys; Flower checks the signature).
  Everything else is 403. `HEAD /` answers 204: its `Date` is the devices' clock check.
- **bounds in time and size**: the TLS handshake and the request header must arrive within
  `HEADER_TIMEOUT_S` together, a body may pause at most `BODY_TIMEOUT_S` between reads and is at
  most `SMALL_BODY_BYTES` (control calls) or `coordinator.max_request_bytes` (replies);
  connections that move nothing for `IDLE_TIMEOUT_S` are closed.
- **per-address shares**: a stream layer counts every TCP connection from its first packet (a
  slow handshake or header counts too) and allows `PER_ADDRESS_CONNECTIONS` per address; requests
  are limited to `PER_ADDRESS_RATE` a second per address (bursts of `PER_ADDRESS_BURST`); and
  `worker_connections` is sized from the fleet (`worker_connections`), so one address holds a
  small share of the door whatever it sends.

The stream layer hands each connection to the HTTP layer over a unix socket with the PROXY
protocol, so the HTTP layer's limits and logs see the real address. Logs (with `$msec`, so that
`door_trouble` can count the last minute) and the socket are in the coordinator's run folder.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from skip2fleet.server.operations.certs import Credentials
from skip2fleet.shared.config import FleetConfig, state_dir
from skip2fleet.shared.errors import FleetError

CONFIG_NAME = "nginx.conf"
FLEET_API = "/v1/fleet/"
# What the pinned Flower's SuperNode sends with node authentication (supernode/
# fleet_http_client.py and fleet_http_connection.py): all POST. Registration and unregistration
# are left out: the coordinator registers keys on its loopback, a SuperNode with a key never does.
FLEET_CALLS = (
    "activate-node",
    "deactivate-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "pull-object",
    "push-object",
    "confirm-message-received",
)
LARGE_BODY_CALLS = ("push-messages", "push-object")  # a device's reply: its adapters, figures
SMALL_BODY_BYTES = 64 << 10  # every other call's protobuf is a few hundred bytes
PUBLIC_KEY_HEADER = "flwr-public-key"  # Flower's FLEET_HTTP_PUBLIC_KEY_HEADER
HEADER_TIMEOUT_S = 10  # TLS handshake and request header, together
BODY_TIMEOUT_S = 10  # the longest pause between two reads of a body
IDLE_TIMEOUT_S = 60  # a connection quiet both ways (devices poll every 3 s)
KEEPALIVE_S = 30
PER_ADDRESS_CONNECTIONS = 16  # a SuperNode keeps at most 3 open, its agent 1
PER_ADDRESS_RATE = 20  # requests a second; an idle SuperNode sends one every 3 s
PER_ADDRESS_BURST = 200  # a round's start: plan, run, FAB and every object of the base
SLOTS_PER_CONNECTION = 4  # stream in and out, HTTP in, SuperLink out
ROOM_FOR_ADDRESSES = 16  # strangers at their cap the door makes room for beside the fleet
MIN_WORKER_CONNECTIONS = 1024
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")  # libnginx-mod-stream
SOCKET_PATH_MAX = 107  # sun_path
ROOT_SOCKETS = Path("/run/skip2fleet-frontdoor")
TROUBLE_STATUSES = frozenset({"400", "403", "408", "413", "429", "444", "499", "503"})


def worker_connections(devices: int) -> int:
    """Room for every device at its cap and `ROOM_FOR_ADDRESSES` more addresses at theirs, so one
    address can hold at most 1/(ROOM_FOR_ADDRESSES + devices) of the door."""
    per_address = PER_ADDRESS_CONNECTIONS * SLOTS_PER_CONNECTION
    return max(MIN_WORKER_CONNECTIONS, per_address * (devices + ROOM_FOR_ADDRESSES))


def run_folder(fleet: FleetConfig) -> Path:
    """The door's pid file, logs, socket and temporary files."""
    return state_dir(fleet) / "coordinator" / "run"


def socket_path(fleet: FleetConfig) -> Path:
    """Where the stream layer hands connections to the HTTP layer. nginx started as root runs
    its workers as `nobody`, which may not traverse the state folder (/root is 0700): then a
    folder of /run (root's alone to create in) that nginx's start makes 0711."""
    if os.geteuid() == 0:
        digest = hashlib.sha256(str(state_dir(fleet).resolve()).encode()).hexdigest()[:16]
        return ROOT_SOCKETS / f"{digest}.sock"
    return run_folder(fleet) / "frontdoor.sock"


def key_header(public_key: Path) -> str:
    """The `flwr-public-key` header a SuperNode with this OpenSSH public key sends: base64 of
    its PEM SubjectPublicKeyInfo (Flower's `public_key_to_bytes`)."""
    key = serialization.load_ssh_public_key(public_key.read_bytes())
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(pem).decode("ascii")


def stream_module() -> Path:
    if not STREAM_MODULE.is_file():
        raise FleetError(
            f"{STREAM_MODULE}: nginx's stream module is missing (the front door's per-address "
            "connection limit needs it): apt install libnginx-mod-stream"
        )
    return STREAM_MODULE


def nginx_config(fleet: FleetConfig, creds: Credentials) -> str:
    """nginx.conf for the front door; its pid, logs and temporary files go to `run_folder`."""
    coordinator = fleet.coordinator
    run_dir = run_folder(fleet)
    socket = socket_path(fleet)
    if len(str(socket)) > SOCKET_PATH_MAX:
        raise FleetError(
            f"{socket}: too long for a unix socket ({len(str(socket))} > {SOCKET_PATH_MAX} "
            "characters); choose a shorter coordinator.state_dir"
        )
    scheme = "https" if coordinator.tls else "http"
    connections = worker_connections(len(fleet.devices))
    tls = (
        f"""
        ssl_certificate {creds.server_cert};
        ssl_certificate_key {creds.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        proxy_ssl_trusted_certificate {creds.ca_cert};
        proxy_ssl_verify on;
        proxy_ssl_name localhost;"""
        if coordinator.tls
        else ""
    )
    allowed = list(FLEET_CALLS)
    # With TLS, node authentication: only the fleet's own keys pass (nginx compares map strings
    # ignoring case; a key that differs only in case would need its own private key, and Flower
    # verifies the signature over the exact header). Without TLS (a test fleet on plain HTTP),
    # SuperNodes register themselves and send no key header.
    if coordinator.tls:
        keys = "".join(
            f'\n        "{key_header(creds.node_public_key(d.name))}" 1;' for d in fleet.devices
        )
    else:
        keys = '\n        "" 1;'
        allowed += ["register-node", "unregister-node"]
    body_limit = {call: SMALL_BODY_BYTES for call in allowed}
    body_limit |= {call: coordinator.max_request_bytes for call in LARGE_BODY_CALLS}
    locations = "".join(
        f"""
        location = {FLEET_API}{call} {{
            client_max_body_size {body_limit[call]};
            proxy_pass {scheme}://127.0.0.1:{coordinator.superlink_port};
        }}"""
        for call in allowed
    )
    temp = "\n    ".join(
        f"{kind}_temp_path {run_dir / ('nginx-' + kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# Written by `fleet deploy` from fleet.yaml; see skip2fleet's docs/security.md.
load_module {stream_module()};
worker_processes 1;
worker_rlimit_nofile {2 * connections + 64};
pid {run_dir / "nginx.pid"};
error_log {run_dir / "nginx-error.log"} warn;
events {{
    worker_connections {connections};
}}
stream {{
    limit_conn_zone $binary_remote_addr zone=door_streams:1m;
    log_format door_stream '$msec $remote_addr stream $status $session_time';
    access_log {run_dir / "nginx-stream.log"} door_stream;
    server {{
        listen {coordinator.address}:{coordinator.port};
        limit_conn door_streams {PER_ADDRESS_CONNECTIONS};
        proxy_pass unix:{socket};
        proxy_protocol on;
        proxy_connect_timeout 5s;
        proxy_timeout {IDLE_TIMEOUT_S}s;
    }}
}}
http {{
    log_format door '$msec $remote_addr "$request_method $request_uri" $status $request_time';
    access_log {run_dir / "nginx-access.log"} door;
    server_tokens off;
    {temp}
    map_hash_bucket_size 1024;
    map_hash_max_size {max(2048, 4 * len(fleet.devices))};
    map "$request_method:$request_uri" $door_call {{
        default 0;
        "~^HEAD:/$" clock;
        "~^POST:{FLEET_API}({"|".join(allowed)})$" 1;
    }}
    map $http_{PUBLIC_KEY_HEADER.replace("-", "_")} $door_key {{
        default 0;{keys}
    }}
    map "$door_call:$door_key" $door_open {{
        default 0;
        "1:1" 1;
        "clock:0" 1;
        "clock:1" 1;
    }}
    limit_req_zone $binary_remote_addr zone=door_requests:1m rate={PER_ADDRESS_RATE}r/s;
    limit_conn_zone $binary_remote_addr zone=door_requests_open:1m;
    server {{
        listen unix:{socket}{" ssl" if coordinator.tls else ""} proxy_protocol;
        set_real_ip_from unix:;
        real_ip_header proxy_protocol;{tls}
        client_header_timeout {HEADER_TIMEOUT_S}s;
        client_body_timeout {BODY_TIMEOUT_S}s;
        send_timeout {IDLE_TIMEOUT_S}s;
        keepalive_timeout {KEEPALIVE_S}s;
        reset_timedout_connection on;
        limit_req zone=door_requests burst={PER_ADDRESS_BURST} nodelay;
        limit_req_status 429;
        limit_conn door_requests_open {PER_ADDRESS_CONNECTIONS};
        limit_conn_status 429;
        proxy_http_version 1.1;
        proxy_set_header Host $host;
        proxy_set_header Connection "";
        proxy_read_timeout {IDLE_TIMEOUT_S}s;
        if ($door_open = 0) {{
            return 403;
        }}
        location = / {{
            return 204;
        }}{locations}
        location / {{
            return 403;
        }}
    }}
}}
"""


def nginx_command(fleet: FleetConfig, config: Path) -> list[str]:
    """nginx in the foreground (a supervised service), its early errors in the run folder too.
    A killed nginx leaves its unix socket behind, and nginx never binds over one: removed first."""
    run_dir = run_folder(fleet)
    return [
        "/bin/sh",
        "-c",
        'mkdir -p -m 0711 "${0%/*}" && rm -f "$0" && exec nginx -e "$1" -c "$2" -g "daemon off;"',
        str(socket_path(fleet)),
        str(run_dir / "nginx-error.log"),
        str(config),
    ]


def write_nginx_config(fleet: FleetConfig, creds: Credentials, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_NAME
    path.write_text(nginx_config(fleet, creds))
    return path


def door_trouble(fleet: FleetConfig, window_s: float = 60.0, now: float | None = None) -> int:
    """Connections and requests the door refused or timed out in the last `window_s` seconds
    (from the tails of its logs; 0 where there are none, e.g. not on the coordinator)."""
    since = (time.time() if now is None else now) - window_s
    count = 0
    for log in ("nginx-access.log", "nginx-stream.log"):
        for line in _tail(run_folder(fleet) / log):
            fields = line.split()
            try:
                stamp = float(fields[0])
            except (IndexError, ValueError):
                continue
            status = fields[-2] if len(fields) >= 2 else ""
            if stamp >= since and status in TROUBLE_STATUSES:
                count += 1
    return count


def door_note(fleet: FleetConfig) -> str:
    """What the door saw, for a message about missing devices ("" when it refused nothing)."""
    refused = door_trouble(fleet)
    if not refused:
        return ""
    return (
        f"; the front door logged {refused} refused or timed-out connections in the last "
        f"minute (a flood, or keys it does not know: see {run_folder(fleet)}/nginx-*.log)"
    )


def _tail(path: Path, limit: int = 4 << 20) -> list[str]:
    """The last `limit` bytes of a log as lines (a flood's log may be long)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode(errors="replace").splitlines()[1 if size > limit else 0 :]
    except OSError:
        return []
