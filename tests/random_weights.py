"""Random weights for comparing two implementations of one network: every parameter and
BatchNorm statistic random, so that a layer applied in the wrong place or with the wrong
constant shows in the output."""

from __future__ import annotations

import torch


def randomise(net: torch.nn.Module, seed: int) -> None:
    """In place: convs and linears ~ N(0, 1/fan_in) (activations stay O(1)-ish through deep
    stacks), BN scales, running variances and PReLU slopes ~ U(0.5, 1.5), biases and running
    means ~ N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if t.ndim >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            elif name.endswith(("running_var", "weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
