"""`fleet serve`: the device's long-lived prediction service (NumPy and the standard library,
never Flower): a Unix socket and a spool folder in, answers, a bounded log and metrics out, always
with the device's active model."""
