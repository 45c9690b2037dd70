"""Classifier rewrites from seed 003 (Sobolewski & Szyc, Sec. II and Table II no. 2).

``gap-classifier``: the fully connected stack is replaced by global average pooling and a single
linear layer, as in Network in Network / the paper's VGG-19 experiment 2 (20.040 M parameters from
38.959 M). The convolutional features keep their trained weights, so a trial fine-tunes.
"""

from __future__ import annotations

from torch import nn

from autoshrink import Stage, Technique, hookimpl


def feature_channels(features: nn.Module) -> int | None:
    """Channels produced by a feature stack: the last layer that declares its width."""
    for module in reversed(list(features.modules())):
        for attribute in ("out_channels", "num_features"):
            if isinstance(getattr(module, attribute, None), int):
                return getattr(module, attribute)
    return None


class GapClassifier(Technique):
    name = "gap-classifier"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"classifier"})
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
        num_classes = [m for m in model.classifier if isinstance(m, nn.Linear)][-1].out_features
        model.pool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(nn.Linear(channels, num_classes))
        return model


@hookimpl
def register_techniques(register):
    register(GapClassifier())
