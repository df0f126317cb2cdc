"""What the coordinator and the devices both import: the numerical core, data sets, errors.

Importing it sets nothing in the process: the entry points do (`shared/process.py`)."""
