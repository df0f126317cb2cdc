"""`fleet`: one command line for the coordinator and its devices, and the dispatch between them.

A device runs `fleet predict` (often once per sensor reading), `fleet rollback` and `fleet serve`
on a board with 512 MB. Built as one tree, every `fleet` command loaded both sides first: the
ServerApp, Flower's server, Ansible's wiring, the benches (77 skip2fleet modules, 0.6 s, for a
`--help`). So this entry knows which commands are the device's and, for those, builds only the
device's tree (`cli/device.py`: `skip2fleet.client` and `skip2fleet.shared`, never
`skip2fleet.server`); every other command, and `fleet --help`, gets the whole tree
(`cli/fleet.py`: the coordinator's commands of `server/cli.py` with the device's). It is also
where the process settings are made (`shared/process.py`), before anything loads NumPy or Flower.
"""

from __future__ import annotations

import sys

from skip2fleet.shared.process import apply_process_settings

DEVICE_COMMANDS = ("predict", "rollback", "serve")  # cli/device.py's, all of them (a test checks)


def command_of(args: list[str]) -> str | None:
    """The command `fleet ARGS` runs (its first word that is not an option), if any."""
    return next((arg for arg in args if not arg.startswith("-")), None)


def main() -> None:
    """The `fleet` console script (and `python -m skip2fleet.cli`)."""
    apply_process_settings()
    if command_of(sys.argv[1:]) in DEVICE_COMMANDS:
        from skip2fleet.cli.device import app
    else:
        from skip2fleet.cli.fleet import app
    app(prog_name="fleet")
