"""Device side: the Flower ClientApp and what it keeps on disk, and `telemetry` (the agent)."""

# First, before anything loads NumPy or Flower: the process settings `shared` makes (one BLAS
# thread; no Flower telemetry). Python imports this package before any of its modules.
import skip2fleet.shared  # noqa: F401
