"""Power and temperature probes, one class per source, each with its root or runner injectable.

Every power probe answers `watts()`: sensors that report power read it, counters (RAPL) and the
CPU-load model derive it from the difference since their previous call. So one sampler
(`client.power.PowerSampler`) integrates joules the same way for all of them. A reading that cannot
be had raises `ProbeError` with its kind: `vanished` (the file or the command is gone: a USB meter
unplugged) or `garbage` (it answered something that is not a number).

On a Raspberry Pi: INA219/226/260 boards appear under hwmon (found by their `name`, since hwmon
numbers change across boots), a Pi 5 reports its PMIC rails through `vcgencmd pmic_read_adc`
(current and voltage rails paired by name; it misses USB loads and conversion loss), thermal zones
report millidegrees. x86 hosts have RAPL energy counters that wrap at `max_energy_range_uj`.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

Runner = Callable[[list[str]], str]


class PowerProbe(Protocol):
    source: str
    estimated: bool  # a model's guess rather than a measurement

    def available(self) -> bool: ...

    def watts(self) -> float: ...


HWMON_CHIPS = ("ina219", "ina226", "ina260", "ina3221", "ina238")


class ProbeError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def _read_number(path: Path) -> float:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ProbeError("vanished", f"{path} ({exc.strerror})") from None
    try:
        return float(text)
    except ValueError:
        raise ProbeError("garbage", f"{path} holds {text[:40]!r}") from None


def run_command(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ProbeError("vanished", f"{' '.join(command)} ({exc})") from None


class HwmonPower:
    """An INA-family power monitor under hwmon: `power1_input` (uW), else bus voltage x current."""

    source, estimated = "hwmon", False

    def __init__(self, root: Path = Path("/sys/class/hwmon"), chips: tuple = HWMON_CHIPS) -> None:
        self.root, self.chips = Path(root), chips

    def _chip(self) -> Path:
        for folder in sorted(self.root.glob("hwmon*")):
            name = folder / "name"
            if name.is_file() and name.read_text().strip() in self.chips:
                return folder
        raise ProbeError("vanished", f"no {'/'.join(self.chips)} chip under {self.root}")

    def available(self) -> bool:
        try:
            self._chip()
        except ProbeError:
            return False
        return True

    def watts(self) -> float:
        chip = self._chip()
        if (chip / "power1_input").exists():
            return _read_number(chip / "power1_input") / 1e6
        return _read_number(chip / "in1_input") / 1e3 * _read_number(chip / "curr1_input") / 1e3


class Pi5Pmic:
    """The Raspberry Pi 5's PMIC rails: the sum of current x voltage over rails that have both."""

    source, estimated = "pi5-pmic", False
    LINE = re.compile(r"^\s*(\S+)_([AV])\s+\w+\(\d+\)=([-+0-9.eE]+)[AV]\s*$")

    def __init__(self, run: Runner = run_command) -> None:
        self.run = run

    def available(self) -> bool:
        try:
            return self.watts() >= 0
        except ProbeError:
            return False

    def watts(self) -> float:
        output = self.run(["vcgencmd", "pmic_read_adc"])
        rails: dict[str, dict[str, float]] = {}
        for line in output.splitlines():
            match = self.LINE.match(line)
            if match:
                rails.setdefault(match[1], {})[match[2]] = float(match[3])
        paired = [r["A"] * r["V"] for r in rails.values() if "A" in r and "V" in r]
        if not paired:
            raise ProbeError("garbage", f"no current/voltage rail pairs in {output[:60]!r}")
        return sum(paired)


class Rapl:
    """x86 RAPL package counters: watts from the energy used since the previous call."""

    source, estimated = "rapl", False

    def __init__(
        self, root: Path = Path("/sys/class/powercap"), clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.root, self.clock = Path(root), clock
        self.previous: tuple[float, dict[Path, float]] | None = None

    def _zones(self) -> list[Path]:
        return [z for z in sorted(self.root.glob("intel-rapl:*")) if z.name.count(":") == 1]

    def available(self) -> bool:
        return any((z / "energy_uj").is_file() for z in self._zones())

    def watts(self) -> float:
        zones = self._zones()
        if not zones:
            raise ProbeError("vanished", f"no RAPL zones under {self.root}")
        now = self.clock()
        counters = {z: _read_number(z / "energy_uj") for z in zones}
        previous, self.previous = self.previous, (now, counters)
        if previous is None or now <= previous[0]:
            return 0.0
        used = 0.0
        for zone, value in counters.items():
            before = previous[1].get(zone, value)
            if value < before:  # the counter wrapped
                value += _read_number(zone / "max_energy_range_uj")
            used += value - before
        return used / 1e6 / (now - previous[0])


class CpuModel:
    """An estimate for boards without a sensor: idle watts plus the span up to full load, times
    the CPU's busy share since the previous call (from /proc/stat)."""

    source, estimated = "cpu-model", True

    def __init__(self, idle_watts: float, full_watts: float, proc: Path = Path("/proc")) -> None:
        self.idle, self.full, self.proc = idle_watts, full_watts, Path(proc)
        self.previous: tuple[float, float] | None = None

    def available(self) -> bool:
        return (self.proc / "stat").is_file()

    def busy_share(self) -> float:
        try:
            first = (self.proc / "stat").read_text().splitlines()[0].split()
            ticks = [float(v) for v in first[1:]]
        except OSError as exc:
            raise ProbeError("vanished", f"{self.proc / 'stat'} ({exc.strerror})") from None
        except (ValueError, IndexError):
            raise ProbeError("garbage", f"{self.proc / 'stat'} has no cpu line") from None
        total, idle = sum(ticks), ticks[3] + (ticks[4] if len(ticks) > 4 else 0.0)
        previous, self.previous = self.previous, (total, idle)
        if previous is None or total <= previous[0]:
            return 0.0
        return max(0.0, min(1.0, 1 - (idle - previous[1]) / (total - previous[0])))

    def watts(self) -> float:
        return self.idle + (self.full - self.idle) * self.busy_share()


class NoProbe:
    """No power sensor and no model asked for: reads zero."""

    source, estimated = "none", False

    def available(self) -> bool:
        return True

    def watts(self) -> float:
        return 0.0


class ThermalZones:
    """The hottest thermal zone, in degrees Celsius (sysfs reports millidegrees)."""

    def __init__(self, root: Path = Path("/sys/class/thermal")) -> None:
        self.root = Path(root)

    def available(self) -> bool:
        return any(self.root.glob("thermal_zone*/temp"))

    def celsius(self) -> float:
        zones = sorted(self.root.glob("thermal_zone*/temp"))
        if not zones:
            raise ProbeError("vanished", f"no thermal zones under {self.root}")
        return max(_read_number(zone) for zone in zones) / 1000.0


def power_probe(
    kind: str,
    sys_root: Path = Path("/sys"),
    proc_root: Path = Path("/proc"),
    idle_watts: float = 1.0,
    full_watts: float = 3.0,
    run: Runner = run_command,
) -> PowerProbe | None:
    """The probe fleet.yaml names; `auto` takes the first that is there (the model last)."""
    candidates = {
        "hwmon": HwmonPower(sys_root / "class" / "hwmon"),
        "pi5-pmic": Pi5Pmic(run),
        "rapl": Rapl(sys_root / "class" / "powercap"),
        "cpu-model": CpuModel(idle_watts, full_watts, proc_root),
    }
    if kind == "none":
        return None
    if kind != "auto":
        return candidates[kind]
    for probe in candidates.values():
        if probe.available():
            return probe
    return None
