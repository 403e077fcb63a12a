"""Torch tensors cross between the notebook and real engines as they were, and CUDA ones land right."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import jupyter_dist as jd
from jupyter_dist import shm
from tests.sent_from_gpu import SentFromGpu
from tests.waiting import poll_for

LARGE_NBYTES = 64 * shm.SHM_MIN_NBYTES  # 64 MiB: through shared memory, as large values go

CASES: dict[str, Callable[[], Any]] = {
    "float32": lambda: torch.randn(3, 5),
    "transposed": lambda: torch.arange(20_000.0).reshape(100, 200).T,
    "strided": lambda: torch.arange(20_000.0)[::3],
    "zero-size": lambda: torch.empty(0, 4),
    "zero-size-middle": lambda: torch.empty(3, 0, 2, dtype=torch.int16),
    "bfloat16": lambda: torch.randn(64, 64).to(torch.bfloat16),
    "bool": lambda: torch.rand(1000) > 0.5,
    "complex": lambda: torch.randn(50, dtype=torch.complex128),
    "conjugated": lambda: torch.randn(50, dtype=torch.complex64).conj(),
    "0-d": lambda: torch.tensor(2.5, dtype=torch.float64),
    "requires-grad": lambda: torch.randn(4, requires_grad=True) * 2,
    "parameter": lambda: torch.nn.Parameter(torch.randn(4, 4)),
    "large": lambda: torch.arange(LARGE_NBYTES // 4, dtype=torch.float32).reshape(-1, 1024),
}


def _describe(t: torch.Tensor) -> tuple[str, torch.dtype, tuple[int, ...], bool]:
    return (type(t).__name__, t.dtype, tuple(t.shape), t.requires_grad)


def assert_same_tensor(result: Any, expected: torch.Tensor) -> None:
    """Same class, dtype, shape, requires_grad and values (a lazy conjugate as its values)."""
    assert _describe(result) == _describe(expected)
    assert result.device.type == "cpu"
    assert torch.equal(result.detach(), expected.detach().resolve_conj())


@pytest.fixture(scope="module")
def torch_engines(cluster: jd.Cluster) -> jd.Cluster:
    """The shared cluster, its engines with ``torch`` imported in their namespace."""
    cluster.run("import torch")
    return cluster


@pytest.mark.parametrize("case", CASES)
def test_a_tensor_pushed_and_pulled_comes_back_as_it_was(
    torch_engines: jd.Cluster, case: str
) -> None:
    tensor = CASES[case]()

    torch_engines[0].push(t=tensor)

    on_engine = torch_engines[0].run("(type(t).__name__, t.dtype, tuple(t.shape), t.requires_grad)")
    assert on_engine == _describe(tensor)
    assert torch_engines[0].run("t.device.type") == "cpu"
    assert_same_tensor(torch_engines[0].pull("t"), tensor)
    torch_engines[0].run("del t")


@pytest.mark.parametrize("case", CASES)
def test_a_tensor_crosses_as_an_argument_and_a_result(torch_engines: jd.Cluster, case: str) -> None:
    tensor = CASES[case]()

    seen, back = torch_engines[1].apply(
        lambda t: ((type(t).__name__, t.dtype, tuple(t.shape), t.requires_grad), t), tensor
    )

    assert seen == _describe(tensor)
    assert_same_tensor(back, tensor)


def test_tensors_inside_containers_cross_both_ways(torch_engines: jd.Cluster) -> None:
    value = {
        "list": [torch.arange(3), torch.ones(2, 2).T],
        "tuple": (torch.tensor(True), {"deep": torch.randn(300_000)}),
        "n": 7,
    }

    torch_engines[0].push(nested=value)
    back = torch_engines[0].pull("nested")
    doubled = torch_engines[0].apply(lambda v: [t * 2 for t in v["list"]], value)

    assert back["n"] == 7
    assert isinstance(back["tuple"], tuple)
    for result, expected in [
        (back["list"][0], value["list"][0]),
        (back["list"][1], value["list"][1]),
        (back["tuple"][0], value["tuple"][0]),
        (back["tuple"][1]["deep"], value["tuple"][1]["deep"]),
    ]:
        assert_same_tensor(result, expected)
    assert all(torch.equal(d, t * 2) for d, t in zip(doubled, value["list"], strict=True))
    torch_engines[0].run("del nested")


def test_a_state_dict_loads_into_the_module_on_the_engine(torch_engines: jd.Cluster) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4)).eval()
    x = torch.randn(5, 8)

    torch_engines[0].push(state=model.state_dict(), x=x)
    y = torch_engines[0].run(
        "model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4)).eval()\n"
        "model.load_state_dict(state)\n"
        "model(x).detach()"
    )
    state_back = torch_engines[0].pull("state")

    assert torch.equal(y, model(x).detach())
    assert list(state_back) == list(model.state_dict())
    for key, expected in model.state_dict().items():
        assert_same_tensor(state_back[key], expected)
    torch_engines[0].run("del model, state, x")


def test_scatter_gives_each_engine_its_chunk_and_gather_joins_them(
    torch_engines: jd.Cluster,
) -> None:
    tensor = torch.arange(30, dtype=torch.bfloat16).reshape(5, 6)

    torch_engines.scatter("rows", tensor)

    assert torch_engines.run("tuple(rows.shape)") == [(3, 6), (2, 6)]
    assert torch_engines.run("rows.dtype") == [torch.bfloat16] * 2
    assert_same_tensor(torch_engines.gather("rows"), tensor)
    torch_engines.run("del rows")


def test_scatter_and_gather_of_a_large_non_contiguous_tensor(torch_engines: jd.Cluster) -> None:
    tensor = torch.randn(1024, LARGE_NBYTES // 4 // 1024).T  # chunks of a transpose are strided

    torch_engines.scatter("cols", tensor)

    assert torch_engines.run("tuple(cols.shape)") == [
        (tensor.shape[0] // 2, 1024),
        (tensor.shape[0] // 2, 1024),
    ]
    assert_same_tensor(torch_engines.gather("cols"), tensor)
    torch_engines.run("del cols")


def test_a_gather_of_single_numbers_says_to_pull_them(torch_engines: jd.Cluster) -> None:
    torch_engines.run("loss = torch.tensor(0.5)")

    with pytest.raises(jd.JupyterDistError, match="0-d torch tensors"):
        torch_engines.gather("loss")
    assert torch_engines.pull("loss") == [torch.tensor(0.5)] * 2
    torch_engines.run("del loss")


def test_a_cuda_tensor_stays_on_the_cpu_of_an_engine_without_a_gpu_with_one_warning(
    torch_engines: jd.Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = torch_engines[0]
    if engine.run("torch.cuda.is_available()"):
        pytest.skip("engine 0 has a GPU: the tensor lands there (tests/integration/test_gpu_*)")
    engine.run(
        "import jupyter_dist.serialize\njupyter_dist.serialize._has_warned_kept_on_cpu = False"
    )
    tensor = torch.randn(LARGE_NBYTES // 4 // 16)
    capsys.readouterr()

    engine.push(g=SentFromGpu(tensor, "cuda:3"))
    seen = ""

    def warned() -> bool:
        nonlocal seen
        seen += capsys.readouterr().err
        return "without a usable GPU" in seen

    poll_for(warned, 10, "the engine's warning shown in the notebook")
    assert engine.apply(lambda t: t.device.type, SentFromGpu(tensor[:5], "cuda:0")) == "cpu"
    engine.run("None")  # a task after both arrivals: their output came before its reply
    seen += capsys.readouterr().err

    assert engine.run("g.device.type") == "cpu"
    assert torch.equal(engine.pull("g"), tensor)
    assert seen.count("without a usable GPU") == 1
    assert "%dist start --gpus all" in seen
    assert seen.startswith("[0] ")
    engine.run("del g")
