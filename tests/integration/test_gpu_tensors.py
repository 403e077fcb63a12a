"""CUDA tensors land on the GPU of the process they arrive in: an engine's, and the notebook's on the way back.

Needs a machine with an NVIDIA GPU and a CUDA build of torch; skipped elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import jupyter_dist as jd
from tests.conftest import _run_cluster

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a GPU and a CUDA build of torch"
    ),
]

LARGE_NBYTES = 64 << 20


@pytest.fixture(scope="module")
def one_engine(runtime_dir: Path, request: pytest.FixtureRequest) -> Iterator[jd.Cluster]:
    """A cluster of one engine pinned to the first GPU, of this module's own."""
    yield from _run_cluster(runtime_dir, None, request, gpus=1)


@pytest.fixture
def gpu_engine(one_engine: jd.Cluster) -> jd.Cluster:
    """That engine, with ``torch`` imported; skips where it sees no GPU."""
    if not one_engine[0].run("import torch\ntorch.cuda.is_available()"):
        pytest.skip("the engine sees no GPU (is CUDA_VISIBLE_DEVICES empty for it?)")
    return one_engine


def _notebook_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _last_gpu() -> torch.device:
    """The sender's GPU with the highest index: where it lands must not depend on it."""
    return torch.device("cuda", torch.cuda.device_count() - 1)


def test_a_cuda_tensor_lands_on_the_engines_gpu_and_comes_back_to_the_notebooks(
    gpu_engine: jd.Cluster,
) -> None:
    tensor = torch.randn(LARGE_NBYTES // 4, device=_last_gpu()).reshape(-1, 256)

    gpu_engine[0].push(t=tensor)

    on_engine = gpu_engine[0].run("t.device.type, t.device.index == torch.cuda.current_device()")
    assert on_engine == ("cuda", True)
    assert gpu_engine[0].run("t.dtype, tuple(t.shape)") == (tensor.dtype, tuple(tensor.shape))
    back = gpu_engine[0].pull("t")
    assert back.device == _notebook_device()
    assert torch.equal(back, tensor.to(back.device))
    gpu_engine[0].run("del t")


def test_a_non_contiguous_cuda_tensor_crosses_as_an_argument_and_a_result(
    gpu_engine: jd.Cluster,
) -> None:
    tensor = torch.randn(300, 200, device=_last_gpu(), requires_grad=True).T

    device, doubled = gpu_engine[0].apply(
        lambda t: (t.device.type, (t * 2).detach().requires_grad_(t.requires_grad)), tensor
    )

    assert device == "cuda"
    assert doubled.device == _notebook_device()
    assert doubled.requires_grad
    assert torch.equal(doubled.detach(), (tensor * 2).detach().to(doubled.device))


def test_a_cuda_model_state_dict_loads_into_the_model_on_the_engines_gpu(
    gpu_engine: jd.Cluster,
) -> None:
    model = torch.nn.Linear(16, 4).to(_last_gpu())
    x = torch.randn(8, 16, device=_last_gpu())

    gpu_engine[0].push(state=model.state_dict(), x=x)
    y = gpu_engine[0].run(
        "model = torch.nn.Linear(16, 4).cuda()\n"
        "model.load_state_dict(state)\n"
        "(next(model.parameters()).device.type, model(x).detach())"
    )

    assert y[0] == "cuda"
    assert torch.allclose(y[1], model(x).detach().to(y[1].device))
    gpu_engine[0].run("del model, state, x")


def test_scatter_of_a_cuda_tensor_puts_each_chunk_on_its_engines_gpu(cluster: jd.Cluster) -> None:
    if not all(cluster.run("import torch\ntorch.cuda.is_available()")):
        pytest.skip("the engines see no GPU")
    tensor = torch.arange(LARGE_NBYTES // 8, dtype=torch.float64, device=_last_gpu()).reshape(
        -1, 128
    )

    cluster.scatter("rows", tensor)

    assert cluster.run("rows.device.type, rows.device.index == torch.cuda.current_device()") == [
        ("cuda", True)
    ] * len(cluster.live_engine_ids())
    gathered = cluster.gather("rows")
    assert gathered.device == _notebook_device()
    assert torch.equal(gathered, tensor.to(gathered.device))
    cluster.run("del rows")


def test_results_land_on_the_device_the_notebook_chose(gpu_engine: jd.Cluster) -> None:
    # Results are unpickled on the client's I/O thread, whose own current device is 0.
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs in the notebook's process")
    torch.cuda.set_device(1)
    try:
        back = gpu_engine[0].apply(lambda: __import__("torch").ones(3, device="cuda"))
        assert back.device == torch.device("cuda", 1)
    finally:
        torch.cuda.set_device(0)
