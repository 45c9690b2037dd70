"""Built-in model families: seed 000's small CNN, CIFAR-style VGG and ResNet.

The VGG and ResNet builds reproduce the baselines of seed 003 (Sobolewski & Szyc): VGG-19 with
batch-norm convolutions and a 4096-4096 fully connected head has 38.959 M parameters for 10
classes; ResNet-101 with a 3x3 stride-1 stem and no max-pool has 42.697 M for 100 classes.
Plain stacks expose ``features``, ``pool`` and ``classifier`` so classifier techniques find them.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from autoshrink import hookimpl
from autoshrink.models import ModelSpec


class ConvNet(nn.Module):
    """A plain convolutional stack followed by pooling and a classifier."""

    def __init__(self, features: nn.Module, pool: nn.Module, classifier: nn.Module):
        super().__init__()
        self.features, self.pool, self.classifier = features, pool, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def smallcnn(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """Seed 000's BaseNetwork: Block 1 (Conv1, Conv2) joined to Block 2 (Conv3, Conv4).

    Tables 1-3 of the paper; without feature reduction Conv3 reads Conv2's 32 maps. The paper
    names no activation; ReLU after every convolution and FC3 is our choice.
    """
    widths = [(in_channels, 16), (16, 32), (32, 32), (32, 128)]
    layers: list[nn.Module] = []
    for cin, cout in widths:
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    side = input_size // 16
    classifier = nn.Sequential(nn.Linear(128 * side * side, 128), nn.ReLU(inplace=True),
                               nn.Linear(128, num_classes))
    return ConvNet(nn.Sequential(*layers), nn.Identity(), classifier)


VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def vgg(config: str):
    def build(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
        """CIFAR-style VGG: 3x3 conv + BN + ReLU stages, 4096-4096 head on the 1x1 map."""
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG_CONFIGS[config]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item),
                           nn.ReLU(inplace=True)]
                channels = item
        classifier = nn.Sequential(
            nn.Linear(512, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, num_classes))
        return ConvNet(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), classifier)

    return build


def resnet(depth: int):
    builders = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50,
                101: torchvision.models.resnet101}

    def build(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
        """torchvision's ResNet with the CIFAR stem: 3x3 stride-1 conv, no max-pool."""
        model = builders[depth](weights=None, num_classes=num_classes)
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model

    return build


@hookimpl
def register_models(register):
    register(ModelSpec("smallcnn", smallcnn, min_input_size=16,
                       description="seed 000 Block1+Block2 CNN (4 conv, 2 FC)"))
    for name in VGG_CONFIGS:
        register(ModelSpec(name, vgg(name), min_input_size=32,
                           description=f"CIFAR-style {name.upper()} with BN and 4096-4096 head"))
    for depth in (18, 50, 101):
        register(ModelSpec(f"resnet{depth}", resnet(depth), min_input_size=8,
                           description=f"ResNet-{depth}, 3x3 stride-1 stem, no max-pool"))
