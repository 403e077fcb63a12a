"""Engines that know where they run, and torch.distributed groups over them (gloo on CPU)."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import jupyter_dist as jd
from jupyter_dist import connection_file
from jupyter_dist.launchers import local
from tests.conftest import _run_cluster
from tests.integration.kernel_session import KernelSession
from tests.nvidia import has_nvidia_driver
from tests.waiting import poll_for

ALL_REDUCE = (
    "import torch, torch.distributed as dist\n"
    "t = torch.ones(3) * (dist.get_rank() + 1)\n"
    "dist.all_reduce(t)\n"
    "t.tolist()"
)


@pytest.fixture(scope="module")
def group_cluster(runtime_dir: Path, request: pytest.FixtureRequest) -> Iterator[jd.Cluster]:
    """Two engines of this module's own, with a torch group formed at start."""
    yield from _run_cluster(runtime_dir, 2, request, torch=True)


def test_engine_context_says_which_engine_runs_the_code(cluster: jd.Cluster) -> None:
    contexts = cluster.apply(jd.engine_context)
    pids = {e.engine_id: e.pid for e in cluster.status()}

    assert [c.engine_id for c in contexts] == cluster.engine_ids
    for context in contexts:
        assert context.n_engines == 2
        assert context.pid == pids[context.engine_id]
        assert context.host == socket.gethostname()
        assert context.gpus == ()  # this machine has no GPU
    with pytest.raises(AttributeError):
        contexts[0].engine_id = 5  # type: ignore[misc]  # frozen


def test_engine_context_in_tasks_and_actor_methods(cluster: jd.Cluster) -> None:
    class Where:
        def engine(self) -> int:
            return jd.engine_context().engine_id

    actor = cluster.actor(Where)
    try:
        assert actor.engine().result(timeout=30) in cluster.engine_ids
        assert cluster.submit(lambda: jd.engine_context().engine_id).result(timeout=30) in (0, 1)
        assert cluster.run("import jupyter_dist as jd\njd.engine_context().engine_id") == [0, 1]
    finally:
        actor.kill()


def test_engine_context_in_the_notebook_says_where_it_works() -> None:
    with pytest.raises(jd.JupyterDistError, match="only means something on an engine"):
        jd.engine_context()


def test_engines_learn_the_cluster_size_as_engines_die_and_return(
    fresh_cluster: jd.Cluster,
) -> None:
    c = fresh_cluster
    os.kill(c.status()[1].pid, signal.SIGKILL)
    poll_for(
        lambda: c[0].apply(lambda: jd.engine_context().n_engines) == 1,
        10,
        "engine 0 learning that engine 1 died",
    )
    c.restart([1])
    assert [ctx.n_engines for ctx in c.apply(jd.engine_context)] == [2, 2]


def test_group_ranks_show_in_the_context_and_survive_across_cells(
    group_cluster: jd.Cluster,
) -> None:
    c = group_cluster
    group = c.torch_group
    assert group is not None
    assert group.backend == "gloo"
    contexts = c.apply(jd.engine_context)
    assert [(x.rank, x.world_size, x.local_rank, x.local_world_size) for x in contexts] == [
        (0, 2, 0, 2),
        (1, 2, 1, 2),
    ]
    assert c.apply(lambda: (os.environ["RANK"], os.environ["MASTER_PORT"])) == [
        ("0", str(group.master_port)),
        ("1", str(group.master_port)),
    ]
    assert c.run(ALL_REDUCE) == [[3.0, 3.0, 3.0]] * 2
    assert c.run("dist.all_reduce(t)\nt.tolist()") == [[6.0, 6.0, 6.0]] * 2  # a later cell


def test_asking_again_for_the_same_group_keeps_it(group_cluster: jd.Cluster) -> None:
    first = group_cluster.torch_group
    again = group_cluster.torch()
    assert again == first  # same port: not formed again
    assert group_cluster.run("dist.get_world_size()") == [2, 2]


def test_ddp_step_leaves_identical_weights_on_both_ranks(group_cluster: jd.Cluster) -> None:
    # The PyTorch DDP tutorial's ToyModel, one optimizer step, different data per rank.
    group_cluster.run(
        "import torch, torch.nn as nn, torch.distributed as dist\n"
        "from torch.nn.parallel import DistributedDataParallel as DDP\n"
        "class ToyModel(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.net1 = nn.Linear(10, 10)\n"
        "        self.relu = nn.ReLU()\n"
        "        self.net2 = nn.Linear(10, 5)\n"
        "    def forward(self, x):\n"
        "        return self.net2(self.relu(self.net1(x)))\n"
        "torch.manual_seed(dist.get_rank())  # different initial weights: DDP must align them\n"
        "model = DDP(ToyModel())\n"
        "optimizer = torch.optim.SGD(model.parameters(), lr=0.001)\n"
        "optimizer.zero_grad()\n"
        "outputs = model(torch.randn(20, 10))\n"
        "nn.MSELoss()(outputs, torch.randn(20, 5)).backward()\n"
        "optimizer.step()\n"
        "weights = {k: v.clone() for k, v in model.module.state_dict().items()}"
    )
    ours, theirs = group_cluster.pull("weights")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].equal(theirs[name]), name


def test_a_collective_without_its_peer_fails_within_the_group_timeout(
    fresh_cluster: jd.Cluster,
) -> None:
    c = fresh_cluster
    c.torch(timeout=3)
    started = time.monotonic()
    with pytest.raises(jd.RemoteError, match="Timed out"):
        c[0].run(ALL_REDUCE)  # engine 1 never joins this collective
    assert time.monotonic() - started < 15


def test_a_killed_rank_fails_the_waiting_collective_naming_it(fresh_cluster: jd.Cluster) -> None:
    c = fresh_cluster
    c.torch()
    c.run("import os, signal, torch, torch.distributed as dist")
    started = time.monotonic()
    with pytest.raises(jd.EngineDiedError) as raised:
        c.run(
            "if dist.get_rank() == 1:\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "dist.all_reduce(torch.ones(1))"
        )
    assert time.monotonic() - started < 15
    assert raised.value.torch_rank == 1
    assert "Torch rank 1 (engine 1" in str(raised.value)

    group = c.restart([1])  # forms the group again, on a new port, with the new engine

    assert group is not None
    assert group.engine_pids[1] == c.status()[1].pid
    assert c.run(ALL_REDUCE) == [[3.0, 3.0, 3.0]] * 2


def test_destroying_the_group_forgets_the_ranks(fresh_cluster: jd.Cluster) -> None:
    c = fresh_cluster
    c.torch()
    c.torch(destroy=True)
    assert c.torch_group is None
    assert [x.rank for x in c.apply(jd.engine_context)] == [None, None]
    assert c.run("import torch.distributed as dist\ndist.is_initialized()") == [False, False]


def test_nccl_is_refused_clearly_on_engines_without_gpus(cluster: jd.Cluster) -> None:
    with pytest.raises(jd.JupyterDistError, match="NCCL backend needs a GPU on every engine"):
        cluster.torch(backend="nccl")


def test_gpus_without_a_driver_is_a_clear_error_before_anything_starts(runtime_dir: Path) -> None:
    if has_nvidia_driver():
        pytest.skip("this machine has an NVIDIA driver")
    before = set(runtime_dir.glob("jupyter-dist-*.json"))
    with pytest.raises(jd.LauncherError, match="no NVIDIA driver") as raised:
        jd.Cluster.start(gpus="all")
    assert "without --gpus" in str(raised.value)
    assert set(runtime_dir.glob("jupyter-dist-*.json")) == before


def test_each_engine_gets_its_own_visible_devices_also_after_a_restart(
    runtime_dir: Path,
) -> None:
    # What --gpus hands the controller; engines on this CPU machine just carry the values.
    plan = ["GPU-aaaa", "GPU-bbbb,GPU-cccc"]
    cluster_id = "gpus-" + os.urandom(4).hex()
    process = local.start_controller(cluster_id, 2, "127.0.0.1", runtime_dir, engine_gpus=plan)
    try:
        path = connection_file.path_for(cluster_id)
        poll_for(lambda: path.exists() or process.poll() is not None, 30, "the controller up")
        assert process.poll() is None
        c = jd.Cluster.connect(cluster_id)
        c.wait_for_engines(2, 30)
        read = "import os\nos.environ.get('CUDA_VISIBLE_DEVICES')"
        assert c.run(read) == plan
        c.restart([1])
        assert c.run(read) == plan
        c.stop()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def _template_maps(c: jd.Cluster) -> str:
    controller = psutil.Process(connection_file.read(c.connection_file).controller_pid)
    templates = [p for p in controller.children() if "engine-template" in " ".join(p.cmdline())]
    assert templates, "the controller has no engine template"
    return Path(f"/proc/{templates[0].pid}/maps").read_text()


def test_engine_templates_never_touch_cuda_and_load_torch_only_when_asked(
    cluster: jd.Cluster, group_cluster: jd.Cluster
) -> None:
    group_cluster.run("import torch")  # the engines have torch and may use CUDA; not the template
    plain, with_torch = _template_maps(cluster), _template_maps(group_cluster)
    assert "libtorch" not in plain
    assert "libtorch" in with_torch  # torch=True: imported once, for every engine it forks
    assert "libcuda.so" not in plain  # the driver loads only when CUDA is initialised
    assert "libcuda.so" not in with_torch


def test_magics_form_the_group_and_form_it_again_after_a_restart(runtime_dir: Path) -> None:
    kernel = KernelSession({**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime_dir)})
    try:
        kernel.run("%load_ext jupyter_dist")
        if not has_nvidia_driver():
            refused = kernel.run("%dist start --gpus all").text("stderr")
            assert "UsageError: %dist start: GPU engines need" in refused  # no traceback
            assert "has no NVIDIA driver" in refused
        started = kernel.run("%dist start -n 2 --torch --torch-timeout 30")
        assert started.error is None, started.error
        assert "Formed the torch.distributed group (gloo, world size 2" in started.text()
        cell = kernel.run(
            "%%distributed --torch\n"
            "import jupyter_dist as jd, torch, torch.distributed as dist\n"
            "t = torch.ones(1)\n"
            "dist.all_reduce(t)\n"
            "print('rank', jd.engine_context().rank, 'sum', t.item())"
        )
        assert cell.error is None, cell.error
        assert "Formed" not in cell.text()  # the group from %dist start is kept
        assert "[0] rank 0 sum 2.0" in cell.text()
        assert "[1] rank 1 sum 2.0" in cell.text()
        restarted = kernel.run("%dist restart 1")
        assert "Formed again the torch.distributed group" in restarted.text()
    finally:
        kernel.run("%dist stop")
        kernel.close()


def test_an_interrupt_ends_a_collective_before_the_group_timeout(
    fresh_cluster: jd.Cluster, tmp_path: Path
) -> None:
    c = fresh_cluster
    c.torch(timeout=120)
    entered = tmp_path / "entered"
    # Engine 1 never joins: gloo would wait 120 s, and no signal wakes it.
    future = c[0].run(f"open({str(entered)!r}, 'w').close()\n" + ALL_REDUCE, block=False)
    poll_for(entered.exists, 30, "the cell started")
    started = time.monotonic()
    c.interrupt([0])
    with pytest.raises(jd.RemoteError):
        future.result(timeout=30)
    assert time.monotonic() - started < 10
    group = c.torch(timeout=120)  # the cut group is formed again, usable
    assert group is not None
    assert c.run(ALL_REDUCE) == [[3.0, 3.0, 3.0]] * 2
