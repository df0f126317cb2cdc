"""Coordinator side, by role: `training` (the base model), `federation` (rounds), `operations`
(deployment and monitoring), `bench` (measurements); `cli` only wires them into `fleet`."""

# First, before anything loads NumPy or Flower: the process settings `shared` makes (one BLAS
# thread; no Flower telemetry). Python imports this package before any of its modules.
import skip2fleet.shared  # noqa: F401
