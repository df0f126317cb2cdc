"""The wheelhouse a device installs from, built on the controller for the device's platform.

A device needs no package index: it gets the project and every dependency as wheels for its own
machine, Python and C library (a Raspberry Pi is aarch64 whatever the controller is). uv is one of
them (Flower depends on it): the device unpacks its binary and installs with it in a second or two
rather than pip's ten. Dependencies are downloaded once per platform and dependency list; the
project's wheel is built once per build, at the same time. The device role asks for its platform's
archive while it runs (`python -m server.wheelhouse ...`, delegated to the controller), so hosts on
one platform share one archive, built under a lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

from shared.errors import FleetError

PROJECT = Path(__file__).resolve().parents[1]
OLDEST_GLIBC_MINOR = 17  # manylinux2014


def build_id() -> str:
    """A hash of the project's code: a new build means a new wheelhouse and a reinstall."""
    digest = hashlib.sha256()
    sources = [PROJECT / "pyproject.toml"]
    for package in ("server", "client", "shared"):
        sources += (PROJECT / package).rglob("*.py")
    for path in sorted(sources):
        digest.update(path.relative_to(PROJECT).as_posix().encode() + path.read_bytes())
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
    """The project's runtime requirements, and uv to install them with."""
    with open(PROJECT / "pyproject.toml", "rb") as handle:
        return [*tomllib.load(handle)["project"]["dependencies"], "uv"]


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
            own = _start([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp, PROJECT])
            try:
                if not deps.is_dir():
                    _download(deps, machine, python, glibc)
            except FleetError:
                own.kill()
                own.wait()
                raise
            _finish(own, "building the project's wheel")
            staged = Path(tmp) / name
            staged.mkdir()
            for wheel in [*deps.glob("*.whl"), *Path(tmp).glob("skip2fleet-*.whl")]:
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
    _finish(_start(command), f"downloading wheels for {machine}, Python {python}")
    partial.replace(deps)


def _start(command: list) -> subprocess.Popen:
    return subprocess.Popen(
        [str(c) for c in command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen, what: str) -> None:
    _, errors = process.communicate()
    if process.returncode != 0:
        raise FleetError(f"{what} failed: {errors.strip()[-600:]}")


def main(argv: list[str]) -> None:
    """Print the archive for STATE BUILD MACHINE PYTHON GLIBC (what the device role runs)."""
    if len(argv) != 5:
        sys.exit("usage: python -m server.wheelhouse STATE BUILD MACHINE PYTHON GLIBC")
    state, build, machine, python, glibc = argv
    try:
        print(wheelhouse(Path(state), build, machine, python, glibc))
    except FleetError as exc:
        sys.exit(f"wheelhouse for {machine}, Python {python}: {exc}")


if __name__ == "__main__":
    main(sys.argv[1:])
