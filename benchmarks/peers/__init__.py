"""One module per system under test; each runs in a child process of its own (``python -m``)."""
