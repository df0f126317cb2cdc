"""What `fleet predict --help` costs a device, in one or more venvs (e.g. an old checkout's and
this one's): modules loaded (all, skip2fleet's, the coordinator's) and the median wall time of
9 runs, the venvs taken in turn so that the machine's load falls on all of them alike.

    python -m tests.startup_cost OLD/.venv .venv
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COUNT = """import sys
sys.argv = ["fleet", "predict", "--help"]
try:
    from skip2fleet.cli import main
except ImportError:  # before the cli/ package: the whole tree was the console script
    from skip2fleet.server.cli import app as main
try:
    main()
except SystemExit:
    pass
names = list(sys.modules)
print("MODULES", len(names), sum(n.startswith("skip2fleet") for n in names),
      sum(n.startswith("skip2fleet.server") for n in names), file=sys.stderr)
"""


def modules(venv: Path) -> dict:
    done = subprocess.run([venv / "bin" / "python", "-c", COUNT], capture_output=True, text=True,
                          cwd="/")  # fmt: skip
    line = next(x for x in done.stderr.splitlines() if x.startswith("MODULES"))
    total, ours, server = map(int, line.split()[1:])
    return {"modules": total, "skip2fleet": ours, "skip2fleet.server": server}


def main(venvs: list[Path], runs: int = 9) -> None:
    seconds: dict[Path, list[float]] = {venv: [] for venv in venvs}
    for venv in venvs:  # a warm-up each: the page cache, not the import, is what a first run pays
        subprocess.run([venv / "bin" / "fleet", "predict", "--help"], capture_output=True, cwd="/")
    for _ in range(runs):
        for venv in venvs:
            started = time.perf_counter()
            subprocess.run([venv / "bin" / "fleet", "predict", "--help"], capture_output=True,
                           check=True, cwd="/")  # fmt: skip
            seconds[venv].append(time.perf_counter() - started)
    for venv in venvs:
        median = round(statistics.median(seconds[venv]), 3)
        print(json.dumps({"venv": str(venv), **modules(venv), "median_s": median}))


if __name__ == "__main__":
    main([Path(arg).resolve() for arg in sys.argv[1:]])
