"""drmm: the Deep Rendering Mixture Model (Patel, Nguyen, Baraniuk, NIPS 2016) on the fused ops of drmm_kernels.

Modules: ``model`` (layer specs, presets, bottom-up with switches, top-down render), ``losses`` (the EG
objective), ``data`` (MNIST, Fashion-MNIST, CIFAR-10, SVHN; labeled subsets), ``train`` (the EG and backprop
trainers), ``cli`` (the ``drmm`` command). See docs/drmm.md.
"""

from .model import DRMM, PRESETS, LayerSpec, Latents, build_model, preset_layers

__all__ = ["DRMM", "PRESETS", "LayerSpec", "Latents", "build_model", "preset_layers"]
