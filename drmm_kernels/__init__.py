"""drmm_kernels: fused conv + (BN) + ReLU + max-pool with switch recording, and the matching top-down render.

>>> import torch, drmm_kernels as dk
>>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
>>> y, switches = dk.conv_relu_pool(x, w, padding=1)
>>> x_hat = dk.render(y, switches, w, padding=1, out_size=x.shape[-2:])
>>> x_hat.shape
torch.Size([2, 3, 8, 8])

Which backend runs the ops: ``auto`` (the default) takes the fastest available for the tensor's device.

>>> dk.available_backends()["reference"]
BackendStatus(available=True, reason='pure PyTorch, always available')
>>> dk.set_backend("reference")                  # for the whole process (or DRMM_KERNELS_BACKEND=reference)
>>> dk.get_backend()
'reference'
>>> dk.set_backend("auto")
>>> with dk.backend("reference"):                # for a block only
...     y_ref, switches_ref = dk.conv_relu_pool(x, w, padding=1)
>>> torch.equal(switches_ref, switches)
True
"""

from .attribution import attribution
from .dispatch import BackendStatus, available_backends, backend, get_backend, resolve_backend, set_backend
from .layers import FusedConvBNReLUPool2d, FusedConvReLUPool2d, Render2d
from .ops import conv_bn_relu_pool, conv_relu_pool, render, switches_to_indices
from .fuse import fuse, fuse_conv_relu_pool
from . import export  # noqa: F401,E402  (gives the ops their ATen composites: torch.onnx.export, torch.jit.trace)

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "available_backends",
    "backend",
    "get_backend",
    "resolve_backend",
    "set_backend",
    "conv_relu_pool",
    "conv_bn_relu_pool",
    "render",
    "switches_to_indices",
    "FusedConvReLUPool2d",
    "FusedConvBNReLUPool2d",
    "Render2d",
    "fuse_conv_relu_pool",
    "fuse",
    "attribution",
]
