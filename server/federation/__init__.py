"""The coordinator's federated runtime: the ServerApp, aggregation, run folders, and the
`fleet simulate` / `fleet run` drivers."""
