"""Operating the fleet: its credentials (CA, TLS, node keys), the SuperLink and the `flwr`
commands that drive it, deployment with Ansible, wheelhouses, monitoring configuration, status,
and the loopback deployment that tests and benchmarks start on one machine."""
