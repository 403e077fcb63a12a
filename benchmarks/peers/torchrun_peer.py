"""torchrun under the torch start-up figure: 8 CPU ranks from the shell to their first all_reduce.

``python -m torch.distributed.run --nproc-per-node N --standalone -m
benchmarks.peers.torch_worker DIR``: the figure runs from launching that
command to the moment the last rank's first all_reduce returned (each rank
writes its ``time.monotonic()``), so torchrun's own start, its rendezvous,
N interpreters importing torch and ``init_process_group("gloo")`` are all
in it, and the ranks' exit is not.
"""

from __future__ import annotations

import sys
import tempfile
import time

from benchmarks.figures import Sizes
from benchmarks.measure import Samples, peer_main, record_starts, run_to_end
from benchmarks.peers.torch_worker import START_TIMEOUT_S, last_rank_done


def torch_start(sizes: Sizes, samples: Samples) -> None:
    n = sizes.engines_large

    def start_once() -> float:
        with tempfile.TemporaryDirectory(prefix="bench-torchrun-") as out:
            begin = time.monotonic()
            run_to_end(
                "torchrun",
                [
                    *(sys.executable, "-m", "torch.distributed.run"),
                    *("--nproc-per-node", str(n), "--standalone"),
                    *("-m", "benchmarks.peers.torch_worker", out),
                ],
                START_TIMEOUT_S,
            )
            return last_rank_done(out, n) - begin

    record_starts(samples, "torch_start", start_once, sizes.torch_start_reps)


if __name__ == "__main__":
    raise SystemExit(peer_main({"torch": torch_start}))
