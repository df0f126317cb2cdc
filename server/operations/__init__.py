"""Operating the fleet: deployment with Ansible, wheelhouses, monitoring configuration, status,
and the loopback deployment that tests and benchmarks start on one machine."""
