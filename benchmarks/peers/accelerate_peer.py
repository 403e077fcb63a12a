"""accelerate under the torch start-up figure: ``notebook_launcher`` to the first all_reduce.

Each start runs in a fresh interpreter, as in a fresh notebook kernel:
``from accelerate import notebook_launcher`` (which imports torch) is timed
on its own as the launcher's import, then the figure runs from the call
``notebook_launcher(first_all_reduce, num_processes=N)`` to the moment the
last rank's first all_reduce returned. The launcher forks its N ranks from
that process, so they find torch imported already.
"""

from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path

from benchmarks.figures import Sizes
from benchmarks.measure import Samples, peer_main, record, record_starts, run_to_end
from benchmarks.peers.torch_worker import START_TIMEOUT_S, last_rank_done

# Run in the fresh interpreter with argv: out_dir, ranks, port. Writes "imported called".
LAUNCH = """
import sys, time
from pathlib import Path
begin = time.monotonic()
from accelerate import notebook_launcher
imported = time.monotonic()
from benchmarks.peers.torch_worker import first_all_reduce
out, n, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
called = time.monotonic()
notebook_launcher(first_all_reduce, (out,), num_processes=n, use_port=port)
Path(out, "launcher").write_text(f"{imported - begin} {called}")
"""


def _free_port() -> str:
    """A port for the launcher's rendezvous: its default, 29500, may be taken on a shared machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def torch_start(sizes: Sizes, samples: Samples) -> None:
    n = sizes.engines_large

    def start_once() -> float:
        with tempfile.TemporaryDirectory(prefix="bench-accelerate-") as out:
            launch = [sys.executable, "-c", LAUNCH, out, str(n), _free_port()]
            run_to_end("notebook_launcher", launch, START_TIMEOUT_S)
            imported_s, called = (float(v) for v in Path(out, "launcher").read_text().split())
            record(samples, "torch_import_launcher", imported_s)
            return last_rank_done(out, n) - called

    record_starts(samples, "torch_start", start_once, sizes.torch_start_reps)


if __name__ == "__main__":
    raise SystemExit(peer_main({"torch": torch_start}))
