"""What the coordinator and the devices both import: the numerical core, data sets, errors.

BLAS threads only add overhead at this model's sizes (batch 20, width 96) and the paper's devices
train on one core, so BLAS runs single-threaded unless the user says otherwise. This must happen
before NumPy (or Flower) is first imported, which is why it lives here.
"""

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

# Flower phones home and checks for updates unless told not to; there is no network for either.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs; silences Ray's notice
