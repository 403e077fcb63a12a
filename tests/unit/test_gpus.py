"""The NVML probe: which GPUs an engine reports, and what it reads of each."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import psutil
import pytest

from jupyter_dist import shm
from jupyter_dist.engine import metrics
from jupyter_dist.engine.metrics import MetricsSampler
from jupyter_dist.gpus import NvmlGpuProbe, parse_visible_devices
from tests.nvidia import has_nvidia_driver
from tests.unit.fake_gpus import FakeDevice, FakeGpuProbe, FakeNvml

UUIDS = [
    "GPU-11111111-aaaa-bbbb-cccc-000000000000",
    "GPU-22222222-aaaa-bbbb-cccc-000000000000",
    "GPU-33333333-aaaa-bbbb-cccc-000000000000",
]


def _nvml() -> FakeNvml:
    return FakeNvml(
        [
            FakeDevice(UUIDS[0], utilization_percent=10),
            FakeDevice(UUIDS[1], utilization_percent=20, memory_used_bytes=5 * 2**30),
            FakeDevice(UUIDS[2], utilization_percent=30),
        ]
    )


@pytest.mark.parametrize(
    ("value", "entries"),
    [
        (None, None),
        ("", []),
        ("0,2", ["0", "2"]),
        (" 1 , GPU-2222 ", ["1", "GPU-2222"]),
        ("1,-1,0", ["1"]),
    ],
)
def test_visible_devices_are_parsed_as_cuda_reads_them(
    value: str | None, entries: list[str] | None
) -> None:
    assert parse_visible_devices(value) == entries


def test_every_gpu_is_reported_when_cuda_visible_devices_is_unset() -> None:
    probe = NvmlGpuProbe(_nvml(), environ={})

    samples = probe.sample(os.getpid())

    assert [(s["index"], s["uuid"], s["utilization_percent"]) for s in samples] == [
        (0, UUIDS[0], 10),
        (1, UUIDS[1], 20),
        (2, UUIDS[2], 30),
    ]


def test_only_the_visible_gpus_are_reported_with_their_cuda_ordinals() -> None:
    probe = NvmlGpuProbe(_nvml(), environ={"CUDA_VISIBLE_DEVICES": "2,GPU-2222"})

    samples = probe.sample(os.getpid())

    assert [(s["index"], s["nvml_index"], s["uuid"]) for s in samples] == [
        (0, 2, UUIDS[2]),
        (1, 1, UUIDS[1]),
    ]


def test_a_visible_device_list_ends_at_its_first_unknown_entry() -> None:
    probe = NvmlGpuProbe(_nvml(), environ={"CUDA_VISIBLE_DEVICES": "1,7,0"})

    assert [s["uuid"] for s in probe.sample(os.getpid())] == [UUIDS[1]]


def test_a_gpu_sample_holds_memory_temperature_power_and_this_process_memory() -> None:
    nvml = _nvml()
    nvml.devices[1].processes = {os.getpid(): 3 * 2**30, 999_999: 2**30}
    probe = NvmlGpuProbe(nvml, environ={"CUDA_VISIBLE_DEVICES": "1"})

    (sample,) = probe.sample(os.getpid())

    assert sample == {
        "index": 0,
        "nvml_index": 1,
        "uuid": UUIDS[1],
        "name": "NVIDIA H100 80GB HBM3",
        "utilization_percent": 20,
        "memory_used_bytes": 5 * 2**30,
        "memory_total_bytes": 80 * 2**30,
        "temperature_c": 40,
        "power_w": 70.0,
        "process_memory_bytes": 3 * 2**30,
    }


def test_a_reading_the_board_does_not_support_is_none() -> None:
    nvml = _nvml()
    nvml.devices[0].power_mw = None
    probe = NvmlGpuProbe(nvml, environ={"CUDA_VISIBLE_DEVICES": "0"})

    assert probe.sample(os.getpid())[0]["power_w"] is None


def test_without_a_driver_no_gpus_are_reported_and_nothing_alarming_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = FakeNvml([], is_missing=True)
    probe = NvmlGpuProbe(nvml, environ={})

    with caplog.at_level(logging.DEBUG, logger="jupyter_dist.gpus"):
        first = probe.sample(os.getpid())
        second = probe.sample(os.getpid())

    assert first == second == []
    assert nvml.calls == ["nvmlInit"]  # tried once, not at every heartbeat
    assert [r.levelname for r in caplog.records] == ["DEBUG"]


def test_nvml_is_initialised_on_the_first_sample_and_shut_down_on_close() -> None:
    nvml = _nvml()
    probe = NvmlGpuProbe(nvml, environ={})
    assert nvml.calls == []

    probe.sample(os.getpid())
    probe.sample(os.getpid())
    probe.close()

    assert nvml.calls == ["nvmlInit", "nvmlShutdown"]
    assert probe.sample(os.getpid()) == []


def test_engine_metrics_carry_cpu_memory_and_the_probe_gpus() -> None:
    gpu = NvmlGpuProbe(_nvml(), environ={"CUDA_VISIBLE_DEVICES": "0"}).sample(os.getpid())
    probe = FakeGpuProbe(gpu)
    sampler = MetricsSampler(probe)

    metrics = sampler.sample()
    sampler.close()

    assert metrics["gpus"] == gpu
    own_rss = psutil.Process().memory_info().rss - shm.kept_unused_nbytes()
    assert metrics["rss_bytes"] == pytest.approx(own_rss, rel=0.05)
    assert isinstance(metrics["cpu_percent"], int)
    assert probe.is_closed


def test_engine_cpu_percent_is_the_cpu_used_since_the_previous_sample() -> None:
    # Measured against this process's own CPU time, not a wall-clock duration: on a
    # loaded machine a busy loop gets only a share of a core.
    sampler = MetricsSampler(FakeGpuProbe([]))
    time.sleep(0.05)
    idle = sampler.sample()["cpu_percent"]
    cpu_start, wall_start = _cpu_seconds(), time.monotonic()
    while _cpu_seconds() - cpu_start < 0.1:
        pass
    busy = sampler.sample()["cpu_percent"]
    expected = 100 * (_cpu_seconds() - cpu_start) / (time.monotonic() - wall_start)
    sampler.close()

    assert idle < 20
    assert busy == pytest.approx(expected, abs=10)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def test_engine_memory_comes_from_psutil_where_there_is_no_proc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics, "STATM_PATH", "/nonexistent/statm")
    sampler = MetricsSampler(FakeGpuProbe([]))

    rss_bytes = sampler.sample()["rss_bytes"]
    sampler.close()

    own_rss = psutil.Process().memory_info().rss - shm.kept_unused_nbytes()
    assert rss_bytes == pytest.approx(own_rss, rel=0.05)


def test_engine_memory_leaves_out_segments_only_kept_mapped_for_the_next_transfer(
    tmp_path: Path,
) -> None:
    nbytes = 16 * shm.SHM_MIN_NBYTES
    shm.SegmentPool("c0ffee", directory=str(tmp_path)).export(memoryview(bytes(nbytes)))
    assert shm.kept_unused_nbytes() >= nbytes  # sent, and kept mapped here

    reported = MetricsSampler(FakeGpuProbe([])).sample()["rss_bytes"]

    assert reported <= psutil.Process().memory_info().rss - nbytes + (1 << 20)


@pytest.mark.gpu
@pytest.mark.skipif(not has_nvidia_driver(), reason="needs an NVIDIA driver (NVML)")
def test_the_real_nvml_reports_each_visible_gpu() -> None:
    probe = NvmlGpuProbe()
    try:
        samples = probe.sample(os.getpid())
    finally:
        probe.close()

    assert samples, "NVML is present but no GPU was reported"
    for index, sample in enumerate(samples):
        assert sample["index"] == index
        assert sample["uuid"].startswith(("GPU-", "MIG-"))
        assert sample["name"]
        assert (sample["memory_total_bytes"] or 0) > 0
        assert 0 <= (sample["utilization_percent"] or 0) <= 100
