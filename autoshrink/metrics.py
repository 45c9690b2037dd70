"""Measurements of a candidate model: parameters, MACs, artifact size, CPU latency."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import statistics
import time

import torch
from ptflops import get_model_complexity_info
from torch import nn


@dataclasses.dataclass(frozen=True)
class Complexity:
    """Counted on the float model, before quantization (ptflops counts 0 for int8 modules)."""

    params: int
    nonzero_params: int
    macs: int


def count_params(model: nn.Module) -> tuple[int, int]:
    """Total and non-zero trainable-shape parameters; a pruning mask's zeros count as zeros."""
    total = nonzero = 0
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if pname.endswith("_orig"):  # torch.nn.utils.prune keeps weight_orig + weight_mask
                base = pname.removesuffix("_orig")
                effective = getattr(module, base)
            else:
                effective = param
            total += param.numel()
            nonzero += int(torch.count_nonzero(effective.detach()))
    return total, nonzero


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of the convolutions and matrix products of one forward pass.

    ptflops' aten backend counts exactly those (not batch-norm, activations or pooling), the
    convention of the FLOPS columns in seed 003's tables. It runs on a copy.
    """
    clone = copy.deepcopy(model).cpu().float().eval()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        macs, _ = get_model_complexity_info(clone, tuple(input_shape), as_strings=False,
                                            print_per_layer_stat=False, backend="aten")
    if macs is None:
        raise RuntimeError("ptflops could not count the MACs of this model")
    return int(macs)


def complexity(model: nn.Module, input_shape: tuple[int, int, int]) -> Complexity:
    total, nonzero = count_params(model)
    return Complexity(params=total, nonzero_params=nonzero, macs=count_macs(model, input_shape))


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, input_shape: tuple[int, int, int], repeats: int = 20) -> float:
    """Median wall time of a batch-1 forward pass on the CPU, after warm-up."""
    return median_call_ms(model.cpu().eval(), torch.randn(1, *input_shape), repeats)


@torch.no_grad()
def median_call_ms(call, x: torch.Tensor, repeats: int = 20) -> float:
    """Median wall time of ``call(x)`` (a model, a loaded export), after three warm-up calls."""
    for _ in range(3):
        call(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0
