"""Classifier rewrites from seed 003 (Sobolewski & Szyc, Sec. II, Table I no. 7, Table II no. 2, 7).

``gap-classifier``: the fully connected stack is replaced by global average pooling and a single
linear layer, as in Network in Network / the paper's VGG-19 experiment 2 (20.040 M parameters from
38.959 M). ``no-fc``: no linear layer at all; a 1x1 convolution maps the last feature map to the
classes and global average pooling gives the logits. The convolutional features keep their
trained weights in both, so a trial fine-tunes.
"""

from __future__ import annotations

import torch
from torch import nn

from autoshrink import Stage, Technique, hookimpl


def feature_channels(module: nn.Module) -> int | None:
    """Channels a module produces: its own declared width, else that of its last child that
    declares one (searched from the end, so a Fire module counts as a whole)."""
    for attribute in ("out_channels", "num_features"):
        if isinstance(getattr(module, attribute, None), int):
            return getattr(module, attribute)
    for child in reversed(list(module.children())):
        channels = feature_channels(child)
        if channels is not None:
            return channels
    return None


class GapClassifier(Technique):
    name = "gap-classifier"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"classifier"})
    order = 90
    paper = "seed 003, Sec. II (GAP) and Table II no. 2"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        classifier = getattr(model, "classifier", None)
        if not isinstance(classifier, nn.Sequential) or not hasattr(model, "features") \
                or not hasattr(model, "pool"):
            return False, ("needs a model with features / pool / classifier attributes"
                           " (VGG-style); this one has none")
        linears = [m for m in classifier if isinstance(m, nn.Linear)]
        if len(linears) < 2:
            return False, "the classifier is already a single linear layer"
        if feature_channels(model.features) is None:
            return False, "cannot tell how many channels the features produce"
        return True, ""

    def apply(self, model: nn.Module, options, ctx) -> nn.Module:
        channels = feature_channels(model.features)
        num_classes = _num_classes(model)
        model.pool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(nn.Linear(channels, num_classes))
        return model


def _num_classes(model: nn.Module) -> int:
    head = model.fc if hasattr(model, "fc") else model.classifier
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features


class NoFc(Technique):
    name = "no-fc"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"classifier"})
    order = 90
    paper = "seed 003, Table I no. 7, Table II no. 7"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        if isinstance(getattr(model, "fc", None), nn.Linear) and hasattr(model, "layer4"):
            return True, ""
        classifier = getattr(model, "classifier", None)
        if (isinstance(classifier, nn.Sequential) and hasattr(model, "features")
                and any(isinstance(m, nn.Linear) for m in classifier)
                and feature_channels(model.features) is not None):
            return True, ""
        return False, "needs a ResNet (fc) or a VGG-style features / classifier model"

    def apply(self, model: nn.Module, options, ctx) -> nn.Module:
        classes = _num_classes(model)
        if hasattr(model, "layer4"):
            model.layer4 = nn.Sequential(model.layer4,
                                         nn.Conv2d(model.fc.in_features, classes, 1))
            model.fc = nn.Identity()
            return model
        channels = feature_channels(model.features)
        model.features = nn.Sequential(*model.features, nn.Conv2d(channels, classes, 1))
        if hasattr(model, "pool"):  # our VGG-style models; others keep their own pooling
            model.pool = nn.AdaptiveAvgPool2d(1)
        model.classifier = ClassAverage(classes)
        return model


class ClassAverage(nn.Module):
    """The logits of a model without linear layers: each class's map averaged over the positions
    the model's own pooling left. Those may arrive flattened (torchvision's VGG pools to 7x7
    and flattens before its classifier) or not (ConvNeXt's classifier flattens itself), so the
    input is read as one block of positions per class, which both layouts are."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.classes, -1).mean(-1)


@hookimpl
def register_techniques(register):
    register(GapClassifier())
    register(NoFc())
