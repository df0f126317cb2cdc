"""Probes against fixture sysfs trees and canned command output; the sampler's integration."""

from __future__ import annotations

from pathlib import Path

import pytest

from skip2fleet.client.telemetry.power import PowerSampler
from skip2fleet.client.telemetry.probes import (
    CpuModel,
    HwmonPower,
    Pi5Pmic,
    ProbeError,
    Rapl,
    ThermalZones,
    power_probe,
)

PMIC = """\
     3V7_WL_SW_A current(0)=0.10000000A
     3V3_SYS_A current(1)=0.50000000A
     1V8_SYS_A current(2)=0.20000000A
     3V7_WL_SW_V volt(8)=3.70000000V
     3V3_SYS_V volt(9)=3.30000000V
     1V8_SYS_V volt(10)=1.80000000V
     EXT5V_V volt(24)=5.12000000V
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def hwmon_tree(root: Path, chip: str = "ina219", number: int = 3, **files: str) -> Path:
    write(root / "hwmon0" / "name", "cpu_thermal\n")  # another chip comes first
    for name, value in {"name": chip + "\n", **files}.items():
        write(root / f"hwmon{number}" / name, value)
    return root


def test_hwmon_finds_the_chip_by_name_and_reads_microwatts(tmp_path):
    probe = HwmonPower(hwmon_tree(tmp_path, power1_input="2500000\n"))
    assert probe.available() and probe.watts() == pytest.approx(2.5)


def test_hwmon_multiplies_bus_voltage_and_current_without_a_power_file(tmp_path):
    probe = HwmonPower(hwmon_tree(tmp_path, "ina226", 7, in1_input="5100\n", curr1_input="400\n"))
    assert probe.watts() == pytest.approx(5.1 * 0.4)


def test_hwmon_vanished_and_garbage_are_told_apart(tmp_path):
    root = hwmon_tree(tmp_path, power1_input="oops\n")
    with pytest.raises(ProbeError) as garbage:
        HwmonPower(root).watts()
    assert garbage.value.kind == "garbage"
    (root / "hwmon3" / "name").unlink()
    with pytest.raises(ProbeError) as vanished:
        HwmonPower(root).watts()
    assert vanished.value.kind == "vanished"


def test_pi5_pmic_pairs_rails_by_name():
    probe = Pi5Pmic(run=lambda command: PMIC)
    assert probe.watts() == pytest.approx(0.1 * 3.7 + 0.5 * 3.3 + 0.2 * 1.8)  # EXT5V has no current
    with pytest.raises(ProbeError, match="garbage"):
        Pi5Pmic(run=lambda command: 'error=1 error_msg="Command not registered"\n').watts()


def test_rapl_differences_handle_the_wrap(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    write(zone / "max_energy_range_uj", "1000000\n")
    write(zone / "energy_uj", "900000\n")
    write(tmp_path / "intel-rapl:0:0" / "energy_uj", "5\n")  # a sub-zone, not counted twice
    times = iter([0.0, 0.5])
    probe = Rapl(tmp_path, clock=lambda: next(times))
    assert probe.watts() == 0.0  # first call primes the counter
    write(zone / "energy_uj", "100000\n")  # wrapped: 100000 + 1000000 - 900000 = 200000 uJ
    assert probe.watts() == pytest.approx(0.2 / 0.5)


def test_cpu_model_is_idle_plus_busy_share(tmp_path):
    stat = write(tmp_path / "stat", "cpu  100 0 100 800 0 0 0 0 0 0\n")
    probe = CpuModel(idle_watts=1.0, full_watts=3.0, proc=tmp_path)
    assert probe.estimated and probe.watts() == 1.0
    stat.write_text("cpu  175 0 175 850 0 0 0 0 0 0\n")  # 150 busy of 200 ticks
    assert probe.watts() == pytest.approx(1.0 + 2.0 * 0.75)


def test_thermal_reports_the_hottest_zone(tmp_path):
    write(tmp_path / "thermal_zone0" / "temp", "48312\n")
    write(tmp_path / "thermal_zone1" / "temp", "61500\n")
    assert ThermalZones(tmp_path).celsius() == pytest.approx(61.5)


def test_auto_takes_the_first_probe_that_is_there(tmp_path):
    sys_root = tmp_path / "sys"
    write(tmp_path / "proc" / "stat", "cpu  1 0 1 8 0 0 0 0 0 0\n")
    failing = lambda command: (_ for _ in ()).throw(ProbeError("vanished", "no vcgencmd"))  # noqa: E731
    assert power_probe("auto", sys_root, tmp_path / "proc", run=failing).source == "cpu-model"
    hwmon_tree(sys_root / "class" / "hwmon", power1_input="1000000\n")
    assert power_probe("auto", sys_root, tmp_path / "proc", run=failing).source == "hwmon"


class Scripted:
    """A probe whose readings are given, one per call; None raises 'vanished'."""

    source, estimated = "scripted", False

    def __init__(self, readings):
        self.readings = iter(readings)

    def watts(self):
        value = next(self.readings)
        if value is None:
            raise ProbeError("vanished", "unplugged")
        return value


def test_sampler_integrates_and_counts_errors():
    times = iter([1.0, 2.0, 3.0, 4.0])
    sampler = PowerSampler(Scripted([0.0, 2.0, None, 4.0, 3.0]), clock=lambda: next(times))
    sampler._started = sampler._last = 0.0
    sampler.probe.watts()  # prime, as start() does
    for _ in range(4):
        sampler.sample()
    assert sampler.joules == pytest.approx(2.0 * 1 + 4.0 * 1 + 3.0 * 1)
    assert sampler.errors == {"vanished": 1} and sampler.peak_watts == 4.0
    assert sampler.mean_watts == pytest.approx(9.0 / 4.0)
