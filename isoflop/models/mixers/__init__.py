"""Recurrent sequence mixers with a short-convolution slot: Mamba-2 and Gated DeltaNet.

Layout as in flash-linear-attention: ops (functions over tensors: ssd.py, delta_rule.py, each a
chunked reference beside its naive recurrence and decode step), their dispatch (scan.py, to fla.py's
fla-core kernels on CUDA when installed), and the layers (mamba2.py, gated_deltanet.py).
"""

from isoflop.models.mixers.gated_deltanet import GatedDeltaNet
from isoflop.models.mixers.mamba2 import Mamba2

__all__ = ["GatedDeltaNet", "Mamba2"]
