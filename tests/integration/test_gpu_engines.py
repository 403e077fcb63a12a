"""GPU engines on a machine with NVIDIA GPUs: pinning, CUDA in the notebook first, NCCL, NVML.

Skipped where there is no GPU (this project's CI machine); run on the device machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import jupyter_dist as jd
from jupyter_dist.gpus import list_gpus
from tests.conftest import _run_cluster
from tests.waiting import poll_for

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a GPU and a CUDA build of torch"
    ),
]


@pytest.fixture(scope="module")
def gpu_cluster(runtime_dir: Path, request: pytest.FixtureRequest) -> Iterator[jd.Cluster]:
    """One engine per visible GPU, started after this process initialised CUDA."""
    torch.ones(1, device="cuda")  # the notebook used CUDA first: engines must still start
    yield from _run_cluster(runtime_dir, None, request, gpus="all")


def test_one_engine_per_gpu_each_pinned_to_its_own(gpu_cluster: jd.Cluster) -> None:
    machine = list_gpus()
    contexts = gpu_cluster.apply(jd.engine_context)

    assert len(contexts) == len(machine)
    assert [[g.uuid for g in c.gpus] for c in contexts] == [[g.uuid] for g in machine]
    assert gpu_cluster.run("import torch\ntorch.cuda.device_count()") == [1] * len(machine)
    assert gpu_cluster.run("import os\nos.environ['CUDA_VISIBLE_DEVICES']") == [
        g.uuid for g in machine
    ]


def test_nvml_shows_each_engines_own_gpu_memory(gpu_cluster: jd.Cluster) -> None:
    gpu_cluster.run("import torch\nheld = torch.empty(256 << 20, dtype=torch.uint8, device='cuda')")

    def every_engine_shows_its_memory() -> bool:
        engines = gpu_cluster.status()
        held = [e.gpus[0].get("process_memory_bytes") or 0 for e in engines if e.gpus]
        return len(held) == len(engines) and all(b >= 256 << 20 for b in held)

    poll_for(every_engine_shows_its_memory, 10, "NVML showing each engine's memory", 0.2)
    gpu_cluster.run("del held")


def test_an_nccl_group_reduces_cuda_tensors(gpu_cluster: jd.Cluster) -> None:
    if len(gpu_cluster.engine_ids) < 2:
        pytest.skip("an NCCL group needs two GPUs")
    group = gpu_cluster.torch()
    assert group is not None
    assert group.backend == "nccl"
    sums = gpu_cluster.run(
        "import torch, torch.distributed as dist\n"
        "t = torch.ones(4, device='cuda') * (dist.get_rank() + 1)\n"
        "dist.all_reduce(t)\n"
        "(t.device.type, t.sum().item())"
    )
    world = len(gpu_cluster.engine_ids)
    expected = 4.0 * world * (world + 1) / 2
    assert sums == [("cuda", expected)] * world
    gpu_cluster.torch(destroy=True)
