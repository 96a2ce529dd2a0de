"""The public, differentiable ops (``torch.library`` namespace ``drmm``), one module per op.

Each op checks its arguments (drmm_kernels/contract.py), then calls a custom op whose implementation asks
drmm_kernels/dispatch.py which backend runs it. Backward formulas are written in terms of other custom ops
(render's adjoints ``gather_conv`` and ``render_wgrad`` in ops/render.py, ``masked_values`` and ``unpool`` in
ops/switches.py), so ``torch.compile(fullgraph=True)`` traces both directions without looking inside a kernel.

>>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
>>> y, sw = conv_relu_pool(x, w, padding=1)
>>> render(y, sw, w, padding=1, out_size=(8, 8)).shape
torch.Size([2, 3, 8, 8])
>>> mean, var = torch.zeros(4), torch.ones(4)
>>> y, sw = conv_bn_relu_pool(x, w, None, None, mean, var, training=True, padding=1)  # updates mean, var
>>> y.shape, bool((mean != 0).all())
(torch.Size([2, 4, 4, 4]), True)
"""

from .conv_bn_relu_pool import conv_bn_relu_pool
from .conv_relu_pool import conv_relu_pool
from .render import render
from .switches import switches_to_indices

__all__ = ["conv_relu_pool", "conv_bn_relu_pool", "render", "switches_to_indices"]
