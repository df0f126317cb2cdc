"""What the coordinator and the devices both import: the numerical core, data sets, errors."""
