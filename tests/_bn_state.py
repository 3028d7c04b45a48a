"""Non-trivial BN state for tests that compare torch_ref with torch.nn from the same state_dict."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn_state_(module: nn.Module, seed: int) -> None:
    """Parameters and statistics away from the defaults (1/0 and 0/1 would hide a swapped term), 3 batches counted."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name == "num_batches_tracked":
                tensor.fill_(3)
            elif name in ("weight", "running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
