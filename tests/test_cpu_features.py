"""Which vector units the CPU has: what studies record and the benchmarks print."""

from __future__ import annotations

import torch

from autoshrink import environment
from autoshrink.cpu_features import instruction_sets
from benchmarks.common import machine_line


def test_instruction_sets_name_the_bf16_units_the_cpu_has(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert instruction_sets() == (f"{torch.backends.cpu.get_cpu_capability()},"
                                  " AVX-512 BF16, AMX")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert instruction_sets() == torch.backends.cpu.get_cpu_capability()


def test_studies_and_benchmarks_record_the_instruction_sets(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    hardware = environment.describe()["hardware"]
    assert "AMX" in hardware["cpu_instructions"]
    line = machine_line()
    assert line.startswith(f"machine: {hardware['cpu']} (") and "AMX" in line
    assert f"torch {torch.__version__}" in line
