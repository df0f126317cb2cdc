"""Coordinator side, by role: `training` (the base model), `federation` (rounds), `operations`
(deployment and monitoring), `bench` (measurements); `cli` only wires them into `fleet`."""
