"""The settings a fleet process makes before NumPy or Flower load, made by its entry point.

Importing a skip2fleet module changes nothing in the process: whatever starts one makes these
settings first, `fleet` (`skip2fleet.cli.main`) in itself, the coordinator's and devices' services
in the environment they start Flower with (`flower_env`, `fleet deploy`'s units), the tests in
`conftest.py`. Children inherit them: the Simulation Engine's workers, the ClientApps a SuperNode
starts, the ServerApps of a SuperLink.

- One BLAS thread: more only add overhead at these models' sizes (batch 20, width 96), and the
  paper's devices train on one core. OpenBLAS reads the setting once, when NumPy loads; set
  later, two bench workers ran 3x slower.
- Flower neither phones home nor checks for updates: there is no network for either.
- Ray (the Simulation Engine) is told there are no GPUs to hide, which silences a notice.

A setting the user made already is kept.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PROCESS_SETTINGS = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def with_process_settings(environment: Mapping[str, str]) -> dict[str, str]:
    """`environment` with every setting it does not make itself."""
    return {**PROCESS_SETTINGS, **environment}


def apply_process_settings() -> None:
    """Make the settings in this process (and so in the processes it starts)."""
    os.environ.update(with_process_settings(os.environ))
