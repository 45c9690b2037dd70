"""What this CPU's vector units offer, as torch reads them.

Which precision trains faster depends on them: on Intel Xeon cores with AVX-512 BF16 but no
AMX, bf16 autocast trained at 0.7x float32's speed; on cores with AMX, VGG-11 at 2.1x (467 against
227 samples/s, `benchmarks.trainer_throughput`). So the trainer asks here, and studies and
benchmark printouts name them beside the CPU's model name, which does not tell them apart
("Intel(R) Xeon(R) Processor" on both).
"""

from __future__ import annotations

import torch


def has_avx512_bf16() -> bool:
    """Whether the CPU has AVX-512 BF16 instructions (bf16 dot products in vector registers)."""
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def has_amx() -> bool:
    """Whether the CPU multiplies bf16 matrices on AMX tiles."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def instruction_sets() -> str:
    """torch's widest vector instruction set on this CPU and its bf16 units, e.g. "AVX512,
    AVX-512 BF16, AMX" or "AVX2"."""
    names = [torch.backends.cpu.get_cpu_capability()]
    names += [name for name, present in (("AVX-512 BF16", has_avx512_bf16()),
                                         ("AMX", has_amx())) if present]
    return ", ".join(names)
