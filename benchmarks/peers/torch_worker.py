"""One rank of the torch start-up figures: join a gloo group, run the first all_reduce, say when.

torchrun runs it as a module (``-m benchmarks.peers.torch_worker DIR``) and
accelerate's ``notebook_launcher`` calls ``first_all_reduce(DIR)`` in each
process it forks; both set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. Each rank writes the ``time.monotonic()`` (one clock for
every process of the machine) at which its first all_reduce returned, so
the parent can tell when the last rank got there.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

START_TIMEOUT_S = 120.0  # a start not at its first all_reduce by then hung (counted, and killed)


def first_all_reduce(out_dir: str) -> None:
    """Join the group the launcher set up, all_reduce a one, write the time it returned."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    returned = time.monotonic()
    if t.item() != dist.get_world_size():
        raise RuntimeError(f"all_reduce of ones gave {t.item()}, not {dist.get_world_size()}")
    Path(out_dir, f"rank{dist.get_rank()}").write_text(repr(returned))
    dist.destroy_process_group()


def last_rank_done(out_dir: str | Path, ranks: int) -> float:
    """The ``time.monotonic()`` at which the last of ``ranks`` ranks had its all_reduce back."""
    times = [float(p.read_text()) for p in Path(out_dir).glob("rank*")]
    if len(times) != ranks:
        raise RuntimeError(f"{len(times)} of {ranks} ranks finished their first all_reduce")
    return max(times)


if __name__ == "__main__":
    first_all_reduce(sys.argv[1])
