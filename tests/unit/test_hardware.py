"""workers.hardware: quick, JSON-able node facts that never raise."""

from __future__ import annotations

import builtins
import json
import os

from workers import hardware
from workers.hardware import describe_node

KEYS = {
    "hostname", "cpu_model", "cpu_count_logical", "memory_total_bytes", "os", "machine",
    "python", "torch", "timm", "cuda", "gpus", "cpu_flags", "runtimes",
}


def test_describe_node_reports_this_machine():
    import torch

    facts = describe_node()
    assert set(facts) == KEYS
    json.dumps(facts)  # travels through Ray and into the store as it is
    assert facts["cpu_count_logical"] == os.cpu_count()
    assert facts["memory_total_bytes"] > 2**27
    assert facts["torch"] and facts["timm"] and facts["python"]
    if torch.cuda.is_available():
        assert len(facts["gpus"]) == torch.cuda.device_count()
        assert all(gpu["name"] and gpu["memory_total_bytes"] > 0 for gpu in facts["gpus"])
    else:
        assert facts["gpus"] == []


def test_missing_proc_files_fall_back(monkeypatch):
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    facts = describe_node()
    assert facts["memory_total_bytes"] > 0  # from sysconf instead of /proc/meminfo
    assert set(facts) == KEYS


def test_a_failing_fact_is_none_not_an_error(monkeypatch):
    def broken() -> str:
        raise OSError("no such device")

    monkeypatch.setattr(hardware, "cpu_model", broken)
    monkeypatch.setattr(hardware, "_gpus", broken)
    facts = describe_node()
    assert facts["cpu_model"] is None and facts["gpus"] is None
    assert facts["hostname"]
