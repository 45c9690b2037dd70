"""A user model as people write them: fixed RGB input, only num_classes as an argument."""

from torch import nn


def tiny_rgb_net(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))


def returns_weights(num_classes):
    """A common mistake: returning a state dict instead of the network."""
    return nn.Linear(8, num_classes).state_dict()


def pointwise_first(num_classes):
    """A network whose input layer is a 1x1 convolution (the probe's masks need 3x3)."""
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def built_for_28x28(num_classes):
    """Another common one: a classifier sized for one input size (Fashion-MNIST's)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 28 * 28, num_classes))


def ignores_num_classes(num_classes):
    """And one that keeps ImageNet's 1000 classes whatever it is asked for."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 1000))


def tiny_densenet(num_classes):
    """torchvision's DenseNet, scaled down: each layer's output is concatenated to its input."""
    from torchvision.models import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                    num_classes=num_classes)


class _WithAuxiliaryClassifier(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head, self.auxiliary = nn.Linear(8, num_classes), nn.Linear(8, num_classes)

    def forward(self, x):
        features = self.features(x)
        logits = self.head(features)
        return (logits, self.auxiliary(features)) if self.training else logits


def with_auxiliary_classifier(num_classes):
    """As torchvision's GoogLeNet: in training it also answers with an auxiliary head."""
    return _WithAuxiliaryClassifier(num_classes)


def needs_a_width(num_classes, width):
    """A builder with an argument of its own, which the search cannot give."""
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.Flatten(), nn.LazyLinear(num_classes))


def fails_to_build(num_classes):
    """One whose own code raises while building."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding="sideways"), nn.Flatten(),
                         nn.LazyLinear(num_classes))
