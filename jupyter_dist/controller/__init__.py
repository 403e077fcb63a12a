"""The controller process: registry, scheduling, results and state of one cluster."""
