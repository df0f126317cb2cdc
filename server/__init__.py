"""Coordinator side: pretraining, benchmarks, the `fleet` command line."""
