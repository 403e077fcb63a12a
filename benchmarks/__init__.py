"""Benchmarks: jupyter-dist side by side with ipyparallel, Dask and Ray, and the floors of this machine.

Run them all with ``make bench`` (or ``python -m benchmarks``); each peer runs
in a child process of its own and reports raw samples as JSON, and the
parent prints one table with medians, ranges and ratios.
"""
