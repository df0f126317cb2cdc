"""Device side: the Flower ClientApp and what it keeps on disk, and `telemetry` (the agent)."""
