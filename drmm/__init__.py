"""drmm: the Deep Rendering Mixture Model (Patel, Nguyen, Baraniuk, NIPS 2016) on the fused ops of drmm_kernels.

Modules, from the model up: ``model`` (layer specs, presets, bottom-up with switches, top-down render), ``drfm``
(the factor-model top), ``priors`` (switch priors), ``losses`` (the EG objective), ``hard_em`` (the closed-form
M-step), ``data`` (MNIST, Fashion-MNIST, CIFAR-10, SVHN; labeled subsets), ``config`` (the training config),
``plan`` (which images each step sees), ``run_dir`` (checkpoints, metrics.csv, summary), ``figures`` (PNGs),
``distributed`` (torchrun data parallelism), ``train`` (the EG, backprop and hard-EM trainers), ``sample``
(drawing from the priors), ``metrics`` (clustering scores), ``paper`` (the paper's MNIST rows), ``errors``
(``UsageError``, the one exception the CLI turns into a one-line message) and ``cli`` (the ``drmm`` command).
See docs/drmm.md.
"""

from .model import DRMM, PRESETS, LayerSpec, Latents, build_model, preset_layers

__all__ = ["DRMM", "PRESETS", "LayerSpec", "Latents", "build_model", "preset_layers"]
