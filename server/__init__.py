"""Coordinator side, by role: `training` (the base model), `federation` (rounds), `operations`
(deployment, credentials, the SuperLink, monitoring), `bench` (measurements); `cli` only lists
the coordinator's commands for `fleet` (`skip2fleet.cli`)."""
