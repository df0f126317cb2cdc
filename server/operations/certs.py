"""The fleet's credentials: a CA, the SuperLink's TLS certificate, and one node key per device.

Created once into the coordinator's state folder (never the repo) and reused: TLS lets devices
verify the SuperLink, node keys let the SuperLink admit only registered devices
(`--enable-supernode-auth`). Node keys are ECDSA P-384 in OpenSSH format, as Flower reads them.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from skip2fleet.shared.atomic import write_atomic
from skip2fleet.shared.config import FleetConfig, state_dir

VALID_DAYS = 3650
# Certificates start this long before they are made: a board without a real-time clock runs
# behind until NTP answers, and its TLS check would fail with "certificate is not yet valid"
# before its agent could say that its clock is wrong.
VALID_BEFORE = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Credentials:
    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.folder / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "superlink.key"

    def node_key(self, device: str) -> Path:
        return self.folder / "nodes" / f"{device}.key"

    def node_public_key(self, device: str) -> Path:
        return self.folder / "nodes" / f"{device}.pub"

    @property
    def pushgateway_password(self) -> Path:
        """What the ServerApp pushes and Prometheus scrapes the Pushgateway with (basic auth)."""
        return self.folder / "pushgateway.password"


def ensure_credentials(folder: Path, addresses: list[str], devices: list[str]) -> Credentials:
    """Create whatever is missing: the CA, a SuperLink certificate for `addresses`, node keys."""
    creds = Credentials(Path(folder).expanduser())
    ca_key_path = creds.folder / "ca.key"
    if not ca_key_path.is_file():
        ca_key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "skip2fleet CA")])
        ca_cert = (
            _builder(name, name, ca_key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA384())
        )
        _write_key(creds.folder / "ca.key", ca_key)
        _write_cert(creds.ca_cert, ca_cert)
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    if not creds.server_cert.is_file() or _sans(creds.server_cert) != set(addresses):
        key = ec.generate_private_key(ec.SECP384R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "skip2fleet SuperLink")])
        cert = (
            _builder(subject, ca_cert.subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName([_san(a) for a in addresses]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA384())
        )
        _write_key(creds.server_key, key)
        _write_cert(creds.server_cert, cert)
    for device in devices:
        if not creds.node_key(device).is_file():
            key = ec.generate_private_key(ec.SECP384R1())
            private = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
            public = key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            write_atomic(creds.node_public_key(device), lambda h, b=public: h.write(b + b"\n"))
            write_atomic(creds.node_key(device), lambda h, b=private: h.write(b), mode=0o600)
    if not creds.pushgateway_password.is_file():
        password = secrets.token_urlsafe(24).encode()
        write_atomic(creds.pushgateway_password, lambda handle: handle.write(password), 0o600)
    return creds


def fleet_credentials(fleet: FleetConfig) -> Credentials:
    """Where the fleet's credentials are, whether or not they were made yet."""
    return Credentials(state_dir(fleet) / "credentials")


def credentials_for(fleet: FleetConfig) -> Credentials:
    """The fleet's CA, SuperLink certificate, node keys and Pushgateway password (created once,
    in the state folder)."""
    addresses = sorted({fleet.coordinator.address, "127.0.0.1", "localhost"})
    return ensure_credentials(
        fleet_credentials(fleet).folder, addresses, [d.name for d in fleet.devices]
    )


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - VALID_BEFORE)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def _san(address: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        return x509.DNSName(address)


def _sans(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in names}


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(path, lambda handle: handle.write(pem), mode=0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    write_atomic(path, lambda handle: handle.write(cert.public_bytes(serialization.Encoding.PEM)))
