"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class FleetError(Exception):
    """A problem with the user's input (a file, an option, a configuration)."""


class DataError(FleetError):
    """A data file or folder is missing, unreadable or malformed; the message names it."""


class Interrupted(FleetError):
    """The user stopped the work (Ctrl-C); the message says what was kept and how to go on.
    The CLI exits with code 130, as a shell does for SIGINT."""
