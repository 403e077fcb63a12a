"""The engine process: runs user code on its main thread, talks to the controller on an I/O thread."""
