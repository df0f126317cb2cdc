"""What a device tells Prometheus: power and temperature probes, the power sampler, the agent."""
