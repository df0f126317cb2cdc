"""Benchmarks (`fleet bench ...`) and their reports: the paper's tables, rounds, aggregations,
monitoring."""
