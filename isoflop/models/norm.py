"""RMSNorm: scale by the reciprocal root-mean-square over the last dim, then a learned gain."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Normalises in float32 whatever the input dtype (bf16 sums of squares lose too much), and
    returns the input's dtype. The gain starts at one and is excluded from weight decay."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.weight._no_weight_decay = True

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (self.dim,), self.weight.float(), self.eps).to(x.dtype)
