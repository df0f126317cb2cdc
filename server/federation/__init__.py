"""The coordinator's federated runtime: the ServerApp, aggregation, run folders, the SuperLink,
credentials, and the `fleet simulate` / `fleet run` drivers."""
