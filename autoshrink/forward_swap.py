"""Give some layers another forward while a block runs, and their own back after it.

The trainer's work-arounds for the CPU's convolution kernels (``autoshrink.strided_conv``,
``autoshrink.matmul_conv``) compute a layer's function another way only while it trains. Only
``forward`` is replaced, so hooks (a pruning mask's, for one) still run, and the model a
technique, a quantizer or the export sees afterwards is unchanged. Blocks nest: an inner
replacement receives the forward the outer one installed, for the calls it passes on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

Forward = Callable[..., object]


def zero_padded_conv(module: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` (not a subclass with a forward of its own) without dilation and
    with numeric zero padding: a layer whose function another forward can compute."""
    return (type(module) is nn.Conv2d and module.dilation == (1, 1)
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


@contextlib.contextmanager
def forwards_replaced(model: nn.Module,
                      replacement: Callable[[nn.Module, Forward], Forward | None]
                      ) -> Iterator[nn.Module]:
    """Within the block, each module of ``model`` for which ``replacement(module, forward)``
    returns a function runs that function as its forward; ``forward`` is what the module ran
    until then. Every module's forward is back on exit, also when the block raises."""
    changed: list[tuple[nn.Module, Forward | None]] = []
    for module in model.modules():
        installed = vars(module).get("forward")  # one an enclosing block gave it, if any
        new = replacement(module, module.forward)
        if new is not None:
            module.forward = new
            changed.append((module, installed))
    try:
        yield model
    finally:
        for module, installed in reversed(changed):
            if installed is None:
                del module.forward
            else:
                module.forward = installed
