"""Training steps of VGG-19 and of compressed rewrites of it, in each precision and memory
layout, and on a GPU the kernels that take a compressed model's step.

Why: on one H200, rewrites of VGG-19 with depthwise, grouped and squeeze-excitation layers
trained 27 s an epoch against the full VGG-19's 3.3-4.2 s, with the GPU 93 % busy
(docs/performance.md, *On a GPU*): the time is in their kernels. This times one training step
(SGD, batch of random 1x32x32 images) of each model in float32 and bf16 autocast, NCHW and
channels_last (the trainer's setting is bf16 channels_last on a GPU), and profiles the trainer's
setting for the last model. The CPU work-arounds of ``autoshrink.train`` are not applied: this
measures PyTorch's own kernels.

Run: ``python -m benchmarks.model_kernels [--batch N] [--steps N]`` (defaults: 128 and 20 on a
GPU, 16 and 2 on the CPU, where VGG-19 takes seconds a step).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from autoshrink.cli.inspect_cmd import parse_apply
from autoshrink.metrics import count_macs
from autoshrink.plan import apply_stage, fixed_plan
from autoshrink.plugins import PluginHost
from autoshrink.technique import Stage, TrialContext

SHAPE = (1, 32, 32)
# plans of the slow trials of the H200 run, as `autoshrink inspect --apply` takes them
REWRITES = {
    "vgg19": [],
    "drop-layers + slim-stem + dwconv + se + gap-classifier": [
        "drop-layers,slim-stem,dwconv", "se:reduction=8", "gap-classifier"],
    "slim-stem + slim-before-gap + ghost + dwconv + grouped-pointwise + se + no-fc": [
        "slim-stem:width=0.25", "slim-before-gap:width=0.25", "ghost:ratio=4",
        "dwconv,grouped-pointwise", "se:reduction=16", "no-fc"],
    "slim-stem + fire + ghost 5x5 + dwconv + grouped-pointwise + se": [
        "slim-stem:width=0.25", "fire", "ghost:ratio=3,cheap_kernel=5", "dwconv:min_channels=32",
        "grouped-pointwise:groups=8", "se"],
}
SETTINGS = [(bf16, layout) for bf16 in (False, True)
            for layout in (torch.contiguous_format, torch.channels_last)]
WARM_UP = 3  # untimed steps first: kernel choice, allocator


def build(host: PluginHost, applied: list[str]) -> torch.nn.Module:
    model = host.model("vgg19").build(10, SHAPE[0], SHAPE[1])
    chosen = [step for text in applied for step in parse_apply(host, text)]
    plan = fixed_plan([t for t, _ in chosen], [o for _, o in chosen])
    return apply_stage(plan, Stage.ARCHITECTURE, model, TrialContext(SHAPE, 10))


def step_ms(model, device, bf16: bool, layout, batch: int, steps: int) -> float:
    model = model.to(device).to(memory_format=layout).train()
    x = torch.randn(batch, *SHAPE, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(WARM_UP):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def top_kernels(model, batch: int, count: int = 10) -> None:
    """The GPU kernels that take most of ``model``'s steps in the trainer's GPU setting."""
    from torch.profiler import ProfilerActivity, profile

    device, steps = torch.device("cuda"), 5
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        step_ms(model, device, True, torch.channels_last, batch, steps)
    events = profiler.key_averages()
    total = sum(map(_self_time, events)) or 1.0
    profiled = WARM_UP + steps
    print(f"  its kernels in bf16 channels_last, {total / profiled / 1e3:.2f} ms a step"
          f" ({profiled} steps profiled), the largest shares:")
    for event in sorted(events, key=_self_time, reverse=True)[:count]:
        print(f"    {_self_time(event) / total:6.1%}  {event.key[:100]}")


def _self_time(event) -> float:
    """Microseconds on the GPU (the attribute's name changed in torch 2.4)."""
    return getattr(event, "self_device_time_total", None) or event.self_cuda_time_total


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128 if cuda else 16)
    parser.add_argument("--steps", type=int, default=20 if cuda else 2)
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"device {torch.cuda.get_device_name(0) if cuda else 'CPU'}, torch {torch.__version__},"
          f" batch {args.batch}, {args.steps} timed steps each")
    host = PluginHost.discover()
    model = None
    for name, steps in REWRITES.items():
        model = build(host, steps)
        macs = count_macs(model, SHAPE)
        cells = "  ".join(
            f"{'bf16' if bf16 else 'fp32'} {'NHWC' if layout == torch.channels_last else 'NCHW'}"
            f" {step_ms(model, device, bf16, layout, args.batch, args.steps):7.2f} ms"
            for bf16, layout in SETTINGS)
        print(f"{name} ({macs / 1e6:.1f}M MACs): {cells}")
    if cuda:
        top_kernels(model, args.batch)


if __name__ == "__main__":
    main()
