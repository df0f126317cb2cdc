"""Every entry point makes `shared`'s process settings before NumPy or Flower load: set after,
BLAS keeps a thread per core (two bench workers then ran 3x slower) and Flower phones home."""

import json
import os
import subprocess
import sys

import pytest

SETTINGS = {"OPENBLAS_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}

# Records each setting's variable at the moment NumPy or Flower is first imported.
WATCH = f"""
import importlib, json, os, sys
VARIABLES = {tuple(SETTINGS)!r}
seen = {{}}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in ("numpy", "flwr") and name not in seen:
            seen[name] = {{v: os.environ.get(v) for v in VARIABLES}}
sys.meta_path.insert(0, Watch())
importlib.import_module(sys.argv[1])
print(json.dumps(seen))
"""


@pytest.mark.parametrize(
    "entry",
    [
        "skip2fleet.server.cli",
        "skip2fleet.client.clientapp",
        "skip2fleet.server.bench.peft",
        # Loads NumPy without touching `client`: fails when only the server's guard is missing.
        "skip2fleet.server.bench.methods",
    ],
)
def test_settings_precede_numpy_and_flower(entry: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", WATCH, entry], env=env, capture_output=True, text=True, check=True
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert "numpy" in seen
    for module, variables in seen.items():
        assert variables == SETTINGS, module
