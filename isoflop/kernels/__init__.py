"""The dynamic short convolution operator (functions over tensors; no nn.Module here).

`reference.py` is the specification. Fast kernels register here and are picked by device;
`set_backend("reference")` forces the PyTorch reference everywhere.
"""

from isoflop.kernels.reference import (
    dynamic_conv_headwise,
    dynamic_conv_headwise_step,
    dynamic_conv_lowrank,
    dynamic_conv_lowrank_step,
    initial_state,
    short_conv,
    static_conv,
    static_conv_step,
)

__all__ = [
    "dynamic_conv_headwise",
    "dynamic_conv_headwise_step",
    "dynamic_conv_lowrank",
    "dynamic_conv_lowrank_step",
    "initial_state",
    "short_conv",
    "static_conv",
    "static_conv_step",
]
