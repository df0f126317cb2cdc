"""`python -m skip2fleet.cli`: `fleet` where its console script is not on PATH (the coordinator's
Ansible role runs it so)."""

from skip2fleet.cli import main

main()
