"""Device side: the Flower ClientApp and what it keeps on disk, the model at work (`predict`),
and `telemetry` (the agent). A device's commands load only this package and `shared`."""
