"""Pool before ReLU while training: the same function, with the ReLU on a quarter of the elements.

ReLU is monotone, so max-pooling and ReLU commute: ``relu(maxpool(x)) == maxpool(relu(x))``
for every input, and the gradients agree as well (both send the gradient to the window's first
maximum when it is positive, and nothing otherwise). Run after the pooling, the ReLU and its
backward pass touch a quarter of the elements of a 2x2 pool. Seed 000's CNN and the VGGs put
ReLU right before every max-pool (the speed-up is in docs/performance.md).
The swap holds only while the trainer runs and is undone afterwards, so the model a technique or
the export sees keeps the user's order; a module with hooks is left where it is, because a hook
would observe a different tensor, and a traced (FX) model is left alone, because its graph calls
modules by name rather than through their ``nn.Sequential``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import fx, nn

MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _swap(container: nn.Sequential, first: str, second: str) -> None:
    modules = container._modules
    modules[first], modules[second] = modules[second], modules[first]


def _commutes(first: nn.Module, second: nn.Module) -> bool:
    """Whether ``first`` is a ReLU that may move behind ``second``, a max-pool."""
    return (type(first) is nn.ReLU and isinstance(second, MAX_POOLS)
            and not second.return_indices and not _hooked(first) and not _hooked(second))


@contextlib.contextmanager
def pool_before_relu(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ReLU directly followed by a max-pool in an ``nn.Sequential``
    runs after it; the original order is restored on exit, also when the block raises."""
    swapped: list[tuple[nn.Sequential, str, str]] = []
    containers = [] if isinstance(model, fx.GraphModule) else model.modules()
    for container in containers:
        if type(container) is not nn.Sequential:  # a subclass may run its modules otherwise
            continue
        names = list(container._modules)
        for first, second in zip(names, names[1:]):
            if _commutes(container._modules[first], container._modules[second]):
                _swap(container, first, second)
                swapped.append((container, first, second))
    try:
        yield model
    finally:
        for container, first, second in reversed(swapped):
            _swap(container, first, second)
