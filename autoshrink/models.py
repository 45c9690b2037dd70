"""Model families: the spec plugins register, and user models named ``package.module:callable``."""

from __future__ import annotations

import copy
import dataclasses
import traceback
from collections.abc import Callable

import torch
from torch import nn

from autoshrink.errors import UsageError
from autoshrink.imports import import_named, parameter_names


def is_depthwise(conv: nn.Module) -> bool:
    """One filter per channel, with no channel multiplier (a float or an int8 convolution).

    The loader resizes such convolutions by their groups, and techniques treat them apart from
    other grouped convolutions (any channel of a depthwise one may go on its own)."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def check_takes_input(model: nn.Module, name: str, num_classes: int,
                      input_shape: tuple[int, int, int], size_flag: str = "--input-size"
                      ) -> None:
    """Refuse a model that cannot classify inputs of ``input_shape`` into ``num_classes``, in
    one line that says so: otherwise the first sign is a traceback from the MAC count or the
    baseline's training. One forward pass of two blank images in evaluation mode, and one in
    training mode on a copy (batch norm statistics move in it), where some models answer with
    auxiliary classifiers' outputs beside their logits."""
    shape = "x".join(map(str, input_shape))
    was_training = model.training
    try:
        with torch.no_grad():
            logits = model.eval()(torch.zeros((2, *input_shape)))
            in_training = copy.deepcopy(model).train()(torch.zeros((2, *input_shape)))
    except Exception as error:
        message = " ".join(str(error).split())
        raise UsageError(f"model {name!r} cannot take {shape} inputs ({type(error).__name__}:"
                         f" {message}); build it from its in_channels and input_size"
                         f" arguments, or pick the size it was built for with {size_flag}"
                         ) from None
    finally:
        model.train(was_training)
    got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    if got != (2, num_classes):
        raise UsageError(f"model {name!r} returns {got} for 2 images of {shape}, not logits of"
                         f" shape (2, {num_classes}); build the classifier from its num_classes"
                         " argument")
    if not isinstance(in_training, torch.Tensor):
        raise UsageError(f"model {name!r} returns {type(in_training).__name__} in training, not"
                         " a tensor of logits (auxiliary classifiers?); build it without them"
                         " (torchvision's GoogLeNet and Inception3: aux_logits=False)")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model family.

    ``factory(num_classes=, in_channels=, input_size=)`` returns an untrained module.
    ``min_input_size`` is the smallest square input the network can take; smaller images are
    resized up to it. ``in_channels`` is the channel count the network insists on (grey images
    are repeated to RGB for a 3-channel model), or None when it adapts to the data.
    """

    name: str
    factory: Callable[..., nn.Module]
    min_input_size: int = 8
    description: str = ""
    in_channels: int | None = None

    def check_input_size(self, input_size: int, given_as: str) -> None:
        """Refuse an input smaller than the network can take, naming the option that set it."""
        if input_size < self.min_input_size:
            raise UsageError(f"{given_as} is too small for model {self.name!r}; use at least"
                             f" {self.min_input_size}x{self.min_input_size}")

    def build(self, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
        model = self.factory(num_classes=num_classes, in_channels=in_channels,
                             input_size=input_size)
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"model {self.name!r} returned {type(model).__name__}, not a torch nn.Module;"
                " make the callable return the network"
            )
        return model


def user_model_spec(reference: str) -> ModelSpec:
    """A ModelSpec for ``package.module:callable``.

    The callable gets those of ``num_classes``, ``in_channels`` and ``input_size`` it names
    (``num_classes`` also when it takes ``**kwargs``); one that does not take ``in_channels`` is
    assumed to read RGB images.
    """
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"model {reference!r} is not of the form package.module:callable")
    try:
        target = getattr(import_named(module_name, "autoshrink_model_"), attribute)
    except Exception as error:  # a missing module or file, or one that fails as it loads
        raise UsageError(
            f"cannot load model {reference!r} ({type(error).__name__}: {error}); name an"
            " importable module (installed, on PYTHONPATH or in the current folder) or a .py"
            " file, and a callable it defines"
        ) from None
    if not callable(target):
        raise UsageError(f"model {reference!r} is not callable; point it at a class or function")
    accepted, any_keyword = parameter_names(target)
    if any_keyword:
        accepted.add("num_classes")  # e.g. torchvision builders take it through **kwargs

    def factory(**kwargs):
        given = {k: v for k, v in kwargs.items() if k in accepted}
        try:
            return target(**given)
        except Exception as error:  # the user's code: say where, in one line
            inside = traceback.extract_tb(error.__traceback__)[1:]  # none: the call itself
            # the last line of the callable's own file that ran, not a library's
            own = [frame for frame in inside if frame.filename == inside[0].filename]
            where = f" at {own[-1].filename}:{own[-1].lineno}" if own else ""
            call = ", ".join(f"{k}={v}" for k, v in given.items())
            raise UsageError(
                f"model {reference!r} raised {type(error).__name__}: {error}{where}, called as"
                f" {attribute}({call}); it is given those of num_classes, in_channels and"
                " input_size it names") from None

    return ModelSpec(name=reference, factory=factory, description=f"user model {reference}",
                     in_channels=None if "in_channels" in accepted else 3)
