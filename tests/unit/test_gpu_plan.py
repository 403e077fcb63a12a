"""Which GPUs each engine gets: --gpus and --gpus-per-engine, and the errors for what is not there."""

from __future__ import annotations

import pytest

from jupyter_dist.errors import LauncherError
from jupyter_dist.gpus import GpuInfo, NvmlUnavailableError, list_gpus
from jupyter_dist.launchers.gpus import plan_engine_gpus
from tests.unit.fake_gpus import FakeDevice, FakeNvml

FOUR = [GpuInfo(i, f"GPU-{i}{i}{i}", "NVIDIA H100 80GB HBM3") for i in range(4)]


def test_no_gpu_options_plan_nothing() -> None:
    assert plan_engine_gpus(None, None, 4, FOUR) is None


@pytest.mark.parametrize(
    ("gpus", "per_engine", "n", "expected"),
    [
        ("all", None, None, ["GPU-000", "GPU-111", "GPU-222", "GPU-333"]),
        ("2", None, None, ["GPU-000", "GPU-111"]),
        (2, None, None, ["GPU-000", "GPU-111"]),
        ("0,3", None, None, ["GPU-000", "GPU-333"]),
        ([3, 1], None, None, ["GPU-333", "GPU-111"]),
        ("all", 2, None, ["GPU-000,GPU-111", "GPU-222,GPU-333"]),
        (None, 2, None, ["GPU-000,GPU-111", "GPU-222,GPU-333"]),
        ("all", None, 2, ["GPU-000", "GPU-111"]),  # -n 2 --gpus all: the first two
    ],
)
def test_gpu_selections_become_one_visible_devices_value_per_engine(
    gpus: object, per_engine: int | None, n: int | None, expected: list[str]
) -> None:
    assert plan_engine_gpus(gpus, per_engine, n, FOUR) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("gpus", "per_engine", "n", "message"),
    [
        ("5", None, None, r"Asked for 5 GPU\(s\)\. This machine has 4 GPU\(s\): 0: NVIDIA H100"),
        ("0,7", None, None, r"There is no GPU \[7\]\. This machine has 4 GPU\(s\)"),
        ("1,1", None, None, "name a GPU twice"),
        ("some", None, None, "--gpus takes 'all', a count such as 2, or GPU indices"),
        ("all", 3, None, r"4 GPU\(s\) do not split into engines of 3 each"),
        ("all", 0, None, "--gpus-per-engine must be 1 or more"),
        ("2", None, 3, r"3 engine\(s\) with 1 GPU\(s\) each need 3 GPUs, but 2 were selected"),
    ],
)
def test_impossible_selections_say_what_the_machine_has(
    gpus: str, per_engine: int | None, n: int | None, message: str
) -> None:
    with pytest.raises(LauncherError, match=message):
        plan_engine_gpus(gpus, per_engine, n, FOUR)


def test_an_empty_visible_set_is_named() -> None:
    with pytest.raises(LauncherError, match="shows no GPU to this process"):
        plan_engine_gpus("all", None, None, [])


def test_listing_follows_this_process_cuda_visible_devices() -> None:
    nvml = FakeNvml([FakeDevice("GPU-aaa", "A100"), FakeDevice("GPU-bbb", "H100")])

    gpus = list_gpus(nvml, {"CUDA_VISIBLE_DEVICES": "1"})

    assert gpus == [GpuInfo(0, "GPU-bbb", "H100")]  # CUDA numbers it 0 in this process
    assert nvml.calls[-1] == "nvmlShutdown"


def test_listing_without_a_driver_says_so() -> None:
    with pytest.raises(NvmlUnavailableError, match="no NVIDIA driver"):
        list_gpus(FakeNvml([], is_missing=True), {})
