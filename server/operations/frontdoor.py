"""The coordinator's front door: nginx in front of a SuperLink that listens on loopback only.

Flower 1.41 serves the Fleet API (what SuperNodes use), the Control API (`flwr run`, `stop`,
`log`, `supernode register`, ... with no authentication in open-source Flower), the Runtime API
and FastAPI's `/docs` on one port. So the SuperLink binds 127.0.0.1, and nginx terminates TLS on
`coordinator.address:port` and forwards `/v1/fleet/` alone; every other path is refused at the
door (403), and a request body larger than `coordinator.max_request_bytes` too (413). Operators
reach the Control API on the coordinator's loopback (`fleet run`, `fleet status`,
`fleet certs --register`).
"""

from __future__ import annotations

from pathlib import Path

from skip2fleet.server.operations.certs import Credentials
from skip2fleet.shared.config import FleetConfig

FLEET_API = "/v1/fleet/"
CONFIG_NAME = "nginx.conf"


def nginx_config(fleet: FleetConfig, creds: Credentials, run_dir: Path) -> str:
    """nginx.conf for the front door; `run_dir` holds its pid, logs and temporary files."""
    coordinator = fleet.coordinator
    scheme = "https" if coordinator.tls else "http"
    listen = f"{coordinator.address}:{coordinator.port}" + (" ssl" if coordinator.tls else "")
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
    # With node authentication devices never register themselves (the coordinator registers
    # their keys on its loopback): the Fleet API's own registration paths stay shut too.
    closed = "".join(
        f"\n        location = {FLEET_API}{path} {{\n            return 403;\n        }}"
        for path in (("register-node", "unregister-node") if coordinator.tls else ())
    )
    temp = "\n    ".join(
        f"{kind}_temp_path {run_dir / ('nginx-' + kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# Written by `fleet deploy` from fleet.yaml; see skip2fleet's README, "Security".
worker_processes 1;
pid {run_dir / "nginx.pid"};
error_log {run_dir / "nginx-error.log"} warn;
events {{
    worker_connections 512;
}}
http {{
    access_log {run_dir / "nginx-access.log"};
    server_tokens off;
    {temp}
    server {{
        listen {listen};{tls}
        client_max_body_size {coordinator.max_request_bytes};
        location {FLEET_API} {{
            proxy_pass {scheme}://127.0.0.1:{coordinator.superlink_port};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_read_timeout 300s;
        }}
{closed}
        location / {{
            return 403;
        }}
    }}
}}
"""


def nginx_command(config: Path, run_dir: Path) -> list[str]:
    """nginx in the foreground (a supervised service), its early errors in `run_dir` too."""
    return ["nginx", "-e", str(run_dir / "nginx-error.log"), "-c", str(config), "-g", "daemon off;"]


def write_nginx_config(fleet: FleetConfig, creds: Credentials, folder: Path, run_dir: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_NAME
    path.write_text(nginx_config(fleet, creds, run_dir))
    return path
