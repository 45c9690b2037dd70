"""Fixed-point and vector (k-means) weight quantization, seed 000 (Kivanc et al., Sec. 3.4).

- ``quantize-fixed-point``: every conv / linear weight becomes Q(x) = round(x * 2^k) * 2^-k
  with integer codes clipped to ``bits`` bits. The paper's formula uses one k; by default
  (``frac_bits=-1``) we take, per layer, the largest k at which the layer's largest weight still
  fits, which keeps the range for layers of very different scale. ``frac_bits=0`` is the paper's
  integer quantization (rounding to whole numbers), which we do not ship as a separate technique:
  it is this one with k = 0 and zeroes nearly every weight of a trained CNN.
- ``quantize-kmeans``: each layer's weights are clustered into 2^bits values by 1-D k-means
  (initialised evenly between the smallest and largest weight, Lloyd iterations) and replaced by
  their centroid: weight sharing with a per-layer codebook.
The model keeps computing in float32. The artifact stores such weights as a palette (the
2^bits values) plus packed b-bit indices, so the file really is about bits/32 of the float size;
``autoshrink.artifact.load_state_dict`` reconstructs the exact weights.

Deviation: the paper applies each quantizer at one chosen bit width. In a search the sampled
``bits`` is the fewest tried: where the quantized model misses the accuracy budget that the
trained model met, the search applies one more bit at a time, up to 8 (``finer``), and records
the width it ended with (``autoshrink.finer_quantization``); ``--set`` keeps a width as given.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from autoshrink import Stage, Technique, hookimpl
from autoshrink.technique import check_range
from autoshrink_plugins.rewrite import weight_layers

FINEST_BITS = 8  # where a search stops raising a quantizer's bits (finer_bits)


def finer_bits(options):
    """One bit more, up to ``FINEST_BITS``: a weight-sharing quantizer that took its trained
    model below the budget is applied again so (autoshrink.finer_quantization)."""
    if options.bits >= FINEST_BITS:
        return None
    return dataclasses.replace(options, bits=options.bits + 1)


@dataclasses.dataclass(frozen=True)
class FixedPointOptions:
    bits: int = 8
    frac_bits: int = -1  # -1: per layer, the most that keeps the largest weight in range

    def __post_init__(self):
        check_range("quantize-fixed-point", "bits", self.bits, 2, 16)
        check_range("quantize-fixed-point", "frac_bits", self.frac_bits, -1, 30)


def fixed_point(weight: torch.Tensor, bits: int, frac_bits: int) -> torch.Tensor:
    largest_code = 2 ** (bits - 1) - 1
    if frac_bits < 0:
        peak = float(weight.abs().max())
        frac_bits = int(torch.floor(torch.log2(torch.tensor(largest_code / peak)))) if peak else 0
    scale = 2.0 ** frac_bits
    return torch.clamp(torch.round(weight * scale), -largest_code - 1, largest_code) / scale


class FixedPoint(Technique):
    name = "quantize-fixed-point"
    stage = Stage.QUANTIZATION
    claims = frozenset({"weight-dtype"})
    Options = FixedPointOptions
    paper = "seed 000, Sec. 3.4 (fixed-point and integer quantization)"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        return (True, "") if weight_layers(model) else (False, "has no conv or linear weights")

    def search_space(self, trial) -> FixedPointOptions:
        return FixedPointOptions(bits=trial.suggest_categorical("bits", [4, 5, 6, 8]))

    def finer(self, options: FixedPointOptions) -> FixedPointOptions | None:
        return finer_bits(options)

    @torch.no_grad()
    def apply(self, model: nn.Module, options: FixedPointOptions, ctx) -> nn.Module:
        for layer in weight_layers(model):
            layer.weight.copy_(fixed_point(layer.weight, options.bits, options.frac_bits))
        return model


@dataclasses.dataclass(frozen=True)
class KmeansOptions:
    bits: int = 4
    iterations: int = 20

    def __post_init__(self):
        check_range("quantize-kmeans", "bits", self.bits, 1, 8)
        check_range("quantize-kmeans", "iterations", self.iterations, 1, 1000)


def kmeans_1d(values: torch.Tensor, clusters: int, iterations: int) -> torch.Tensor:
    """Centroids of a 1-D k-means (linear initialisation, as in Deep Compression).

    Exact Lloyd iterations done on the sorted values: in one dimension each cluster is the run
    of values between two midpoints of neighbouring centroids, so with prefix sums an iteration
    costs k binary searches instead of a pass over every weight (a 4096x4096 layer: 16 s -> 3 s,
    the sort being most of it).
    Ties at a midpoint go to the lower centroid, as in :func:`nearest`.
    """
    ordered = values.flatten().double().sort().values
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), ordered.cumsum(0)])
    centroids = torch.linspace(float(ordered[0]), float(ordered[-1]), clusters,
                               dtype=torch.float64)
    end = torch.tensor([len(ordered)])
    for _ in range(iterations):
        cuts = torch.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2, right=True)
        edges = torch.cat([torch.zeros(1, dtype=torch.long), cuts, end])
        counts = edges[1:] - edges[:-1]
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.equal(moved, centroids):
            break
        centroids = moved  # stays sorted: each mean lies inside its own run of values
    return centroids.float()


def nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    ordered, order = centroids.sort()
    right = torch.searchsorted(ordered, values).clamp(1, len(ordered) - 1)
    left = right - 1
    choose_left = (values - ordered[left]).abs() <= (ordered[right] - values).abs()
    return order[torch.where(choose_left, left, right)]


class Kmeans(Technique):
    name = "quantize-kmeans"
    stage = Stage.QUANTIZATION
    claims = frozenset({"weight-dtype"})
    Options = KmeansOptions
    paper = "seed 000, Sec. 3.4 (vector quantization)"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        return (True, "") if weight_layers(model) else (False, "has no conv or linear weights")

    def search_space(self, trial) -> KmeansOptions:
        return KmeansOptions(bits=trial.suggest_int("bits", 2, 6))

    def finer(self, options: KmeansOptions) -> KmeansOptions | None:
        return finer_bits(options)

    @torch.no_grad()
    def apply(self, model: nn.Module, options: KmeansOptions, ctx) -> nn.Module:
        for layer in weight_layers(model):
            weight = layer.weight.detach().float().cpu()
            if weight.numel() <= 2 ** options.bits:
                continue
            centroids = kmeans_1d(weight, 2 ** options.bits, options.iterations)
            shared = centroids[nearest(weight.flatten(), centroids)].reshape(weight.shape)
            layer.weight.copy_(shared)
        return model


@hookimpl
def register_techniques(register):
    register(FixedPoint())
    register(Kmeans())
