"""CPU threads follow the CPUs the process may use (issue 29): affinity, cgroup quota, the
processes of one torchrun job, DataLoader workers; a busy machine is said in one line."""

from __future__ import annotations

import os

import pytest
import torch

import aepsl.runtime as runtime


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({}, None),
    ],
    ids=["v2-unlimited", "v2-1.5", "v1-unlimited", "v1-3", "none"],
)
def test_cgroup_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert runtime.cgroup_cpu_quota(tmp_path) == expected


def test_usable_cpus_is_the_affinity_capped_by_the_quota(tmp_path):
    mask = len(os.sched_getaffinity(0))
    assert runtime.usable_cpus(tmp_path) == mask  # no cgroup files: the mask
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: at least one
    assert runtime.usable_cpus(tmp_path) == 1


def test_threads_are_shared_by_the_job_and_left_to_the_user(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(runtime, "usable_cpus", lambda: 8)
        monkeypatch.setattr(runtime, "_threads_configured", False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert runtime.configure_threads(num_workers=1) == 3  # 8 CPUs / 2 processes - 1 worker
        assert torch.get_num_threads() == 3
        monkeypatch.setattr(runtime, "_threads_configured", False)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice stands
        torch.set_num_threads(2)
        assert runtime.configure_threads(num_workers=0) == 2
    finally:
        torch.set_num_threads(before)


def test_a_busy_machine_is_said_in_one_line(monkeypatch, capsys):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
        monkeypatch.setattr(runtime, "_threads_configured", False)
        monkeypatch.setattr(os, "getloadavg", lambda: (4.0, 4.0, 4.0))
        runtime.configure_threads()
        out = capsys.readouterr().out
        assert out.startswith("note: the machine is busy (load 4.0 on 2 usable CPUs)")
        assert "OMP_NUM_THREADS=1 taskset -c N" in out and "OMP_WAIT_POLICY=PASSIVE" in out
        assert out.count("\n") == 1
    finally:
        torch.set_num_threads(before)


def test_auto_workers_follow_the_device_and_the_process_share(monkeypatch):
    from aepsl.config import load_config
    from aepsl.record import resolved_config

    monkeypatch.setattr(runtime, "usable_cpus", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cpu = load_config(None, ["device=cpu"])
    assert runtime.loader_workers(cpu) == 0  # the cores run the network
    assert runtime.crf_workers(cpu) == 8  # 16 CPUs / 2 processes
    monkeypatch.setattr(runtime, "wants_cuda", lambda config: True)
    assert runtime.loader_workers(cpu) == 7  # on a GPU: its share less one for itself
    given = load_config(None, ["data.num_workers=3", "crf.workers=1"])
    assert (runtime.loader_workers(given), runtime.crf_workers(given)) == (3, 1)
    assert (
        resolved_config(given)["runtime"] | {"num_workers": 3, "crf_workers": 1}
        == (resolved_config(given)["runtime"])
    )


def test_labels_workers_start_only_for_enough_images(monkeypatch):
    from aepsl.config import load_config

    monkeypatch.setattr(runtime, "usable_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    auto = load_config(None, [])
    per = runtime.LABELS_IMAGES_PER_WORKER
    assert runtime.labels_workers(auto, per - 1) == 1  # in this process
    assert runtime.labels_workers(auto, 3 * per) == 3
    assert runtime.labels_workers(auto, 10_582) == 16
    assert runtime.labels_workers(load_config(None, ["labels.workers=2"]), 1) == 2
