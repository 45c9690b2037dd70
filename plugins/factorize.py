"""Asymmetric factorisation (Inception v3), seed 003 (Sec. II; Table I no. 3, Table II no. 3).

Every k x k convolution becomes a k x 1 convolution followed by a 1 x k one. The first keeps the
input width and the second maps to the output width: with this choice the paper's VGG-19 + GAP
count is reproduced (13.114 M against 13.103 M; the other order gives 13.90 M).
Weights are inherited: the pair starts as the best rank-``in_channels`` approximation (SVD) of
the original kernel, which is exact whenever the original kernel has that rank.
"""

from __future__ import annotations

import torch
from torch import nn

from autoshrink import Stage, Technique, hookimpl
from autoshrink_plugins.rewrite import is_plain_conv, replace_modules


@torch.no_grad()
def factorized(conv: nn.Conv2d) -> nn.Sequential:
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    cin, cout = conv.in_channels, conv.out_channels
    vertical = nn.Conv2d(cin, cin, (kh, 1), (sh, 1), (ph, 0), bias=False)
    horizontal = nn.Conv2d(cin, cout, (1, kw), (1, sw), (0, pw), bias=conv.bias is not None)
    # W[o, i, h, w] as a matrix over (o, w) x (i, h); rank-cin factors give both kernels
    matrix = conv.weight.detach().float().permute(0, 3, 1, 2).reshape(cout * kw, cin * kh)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = min(cin, s.numel())
    root = s[:rank].sqrt()
    first = torch.zeros(cin, cin, kh)
    first[:rank] = (vh[:rank] * root[:, None]).reshape(rank, cin, kh)
    second = torch.zeros(cout, kw, cin)
    second[:, :, :rank] = (u[:, :rank] * root[None]).reshape(cout, kw, rank)
    vertical.weight.copy_(first.unsqueeze(-1))
    horizontal.weight.copy_(second.permute(0, 2, 1).unsqueeze(2))
    if conv.bias is not None:
        horizontal.bias.copy_(conv.bias)
    return nn.Sequential(vertical, horizontal)


def _square_spatial(module: nn.Module) -> bool:
    return is_plain_conv(module, "spatial") and module.kernel_size[0] == module.kernel_size[1]


class FactorizeNx1(Technique):
    name = "factorize-nx1"
    stage = Stage.ARCHITECTURE
    claims = frozenset({"spatial-convs"})
    order = 40
    paper = "seed 003, Sec. II (Nx1-1xN), Table I no. 3, Table II no. 3"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        if any(_square_spatial(m) for m in model.modules()):
            return True, ""
        return False, "has no ordinary square k x k convolution (k > 1)"

    def apply(self, model: nn.Module, options, ctx) -> nn.Module:
        replace_modules(model, _square_spatial, factorized)
        return model


@hookimpl
def register_techniques(register):
    register(FactorizeNx1())
