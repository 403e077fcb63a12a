"""Launchers start controller and engine processes and hand back Popen-like handles."""
