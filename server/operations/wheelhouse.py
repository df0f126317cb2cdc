"""The wheelhouse a device installs from, built on the controller for the device's platform.

A device needs no package index: it gets the project and every dependency as wheels for its own
machine, Python and C library (a Raspberry Pi is aarch64 whatever the controller is). uv is one of
them (Flower depends on it): the device unpacks its binary and installs with it in a second or two
rather than pip's ten. Dependencies are downloaded once per platform and dependency list; the
project's wheel is written once per build. The device role asks for its platform's archive while
it runs (`python -m` this module, delegated to the controller), so hosts on one platform share one
archive, built under a lock.

The project's own wheel is written straight from the installed package (pure Python, no build
step), so a controller that runs from a wheel builds devices' wheelhouses as a checkout does.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from skip2fleet.shared.errors import FleetError

DISTRIBUTION = "skip2fleet"
PARTS = ("cli", "server", "client", "shared", "ansible")  # `skip2fleet`'s parts (a test checks)
OLDEST_GLIBC_MINOR = 17  # manylinux2014


def package_root(part: str) -> Path:
    """Where `skip2fleet.<part>` lives: the checkout's folder, or the wheel's in site-packages."""
    spec = importlib.util.find_spec(f"{DISTRIBUTION}.{part}")
    return Path(spec.submodule_search_locations[0])


def package_files() -> Iterator[tuple[str, Path]]:
    """(name inside the wheel, file) for every file of the installed package, in a fixed order."""
    for part in PARTS:
        root = package_root(part)
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                yield f"{DISTRIBUTION}/{part}/{path.relative_to(root).as_posix()}", path


def build_id() -> str:
    """A hash of the project's code and requirements: a new build means a reinstall."""
    digest = hashlib.sha256("\n".join(dependencies()).encode())
    for name, path in package_files():
        digest.update(name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def platform_tags(machine: str, glibc: str) -> list[str]:
    """Every manylinux tag a device with this glibc can run, newest first."""
    try:
        major, minor = (int(p) for p in glibc.split(".")[:2])
    except ValueError:
        raise FleetError(f"C library {glibc!r}: not glibc (musl is not supported)") from None
    if major != 2 or minor < OLDEST_GLIBC_MINOR:
        raise FleetError(f"glibc {glibc}: manylinux wheels need glibc 2.17 or newer")
    tags = [f"manylinux_2_{m}_{machine}" for m in range(minor, OLDEST_GLIBC_MINOR - 1, -1)]
    return [*tags, f"manylinux2014_{machine}"]


def dependencies() -> list[str]:
    """The project's runtime requirements (no extras), and uv to install them with."""
    requirements = metadata.requires(DISTRIBUTION) or []
    return [*(r for r in requirements if "extra ==" not in r), "uv"]


def write_own_wheel(folder: Path) -> Path:
    """The project's wheel, from the installed package and its metadata (deterministic)."""
    dist = metadata.distribution(DISTRIBUTION)
    version = dist.version
    info = f"{DISTRIBUTION}-{version}.dist-info"
    wheel_meta = (
        "Wheel-Version: 1.0\nGenerator: skip2fleet\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    entries = [(name, path.read_bytes()) for name, path in package_files()]
    entries += [
        (f"{info}/METADATA", dist.read_text("METADATA").encode()),
        (f"{info}/entry_points.txt", (dist.read_text("entry_points.txt") or "").encode()),
        (f"{info}/WHEEL", wheel_meta.encode()),
    ]
    record = [f"{name},sha256={_urlsafe_sha256(data)},{len(data)}" for name, data in entries]
    entries.append((f"{info}/RECORD", ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()))
    path = folder / f"{DISTRIBUTION}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in entries:
            wheel.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data)
    return path


def _urlsafe_sha256(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheelhouse(state: Path, build: str, machine: str, python: str, glibc: str) -> Path:
    """`wheelhouse-<build>-<platform>.tar`, built unless it is there."""
    platform = f"{machine}-py{python}-glibc{glibc}"
    name = f"wheelhouse-{build}-{platform}"
    folder = state / "wheelhouse"
    archive = folder / f"{name}.tar"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if archive.is_file():
            return archive
        deps_key = hashlib.sha256("\n".join([platform, *dependencies()]).encode()).hexdigest()
        deps = folder / f"deps-{platform}-{deps_key[:12]}"
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            if not deps.is_dir():
                _download(deps, machine, python, glibc)
            staged = Path(tmp) / name
            staged.mkdir()
            for wheel in [*deps.glob("*.whl"), write_own_wheel(Path(tmp))]:
                (staged / wheel.name).hardlink_to(wheel)
            partial = archive.with_suffix(".partial")
            with tarfile.open(partial, "w") as tar:
                tar.add(staged, arcname=name)
            partial.replace(archive)
    return archive


def _download(deps: Path, machine: str, python: str, glibc: str) -> None:
    partial = deps.with_name(deps.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    platforms = [arg for tag in platform_tags(machine, glibc) for arg in ("--platform", tag)]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        *platforms,
        "--python-version",
        python,
        "--implementation",
        "cp",
        "-d",
        str(partial),
        *dependencies(),
    ]
    _run(command, f"downloading wheels for {machine}, Python {python}")
    partial.replace(deps)


def _run(command: list, what: str) -> None:
    done = subprocess.run(
        [str(c) for c in command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise FleetError(f"{what} failed: {done.stderr.strip()[-600:]}")


def main(argv: list[str]) -> None:
    """Print the archive for STATE BUILD MACHINE PYTHON GLIBC (what the device role runs)."""
    if len(argv) != 5:
        sys.exit(f"usage: python -m {__spec__.name} STATE BUILD MACHINE PYTHON GLIBC")
    state, build, machine, python, glibc = argv
    try:
        print(wheelhouse(Path(state), build, machine, python, glibc))
    except FleetError as exc:
        sys.exit(f"wheelhouse for {machine}, Python {python}: {exc}")


if __name__ == "__main__":
    main(sys.argv[1:])
