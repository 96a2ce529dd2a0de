"""The Deep Rendering Mixture Model (NN-DRMM flavour): bottom-up inference with switches, top-down rendering.

A DRMM is a stack of conv layers (template matching) whose ReLU is the max over the render/don't-render switch
``a`` and whose max-pool is the max over the translational nuisance ``t`` (docs/model.md#the-generative-model and
#bottom-up-inference). The last layer's features are read out by a dense layer, ``logits = W^T h + b``; column
``c`` of ``W`` reshaped to the top feature map is the class template ``mu_c`` (docs/model.md#class-templates).
Rendering runs the same filters backwards (tied weights, ``conv_transpose2d``) with the switches recorded bottom-up
(docs/model.md#top-down-rendering).

The fused ops of ``drmm_kernels`` do the work: ``conv_bn_relu_pool`` / ``conv_relu_pool`` bottom-up (``pool=1``
for layers without max-pooling; a global mean pool is done here in torch) and ``render`` top-down through the
*raw* conv weight (``scale=None``: the BN is not inverted, as in the authors' code).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import drmm_kernels as dk
from drmm_kernels.contract import OFFSET_MASK, ON_BIT

PADDINGS = ("valid", "same", "full")
POOLS = ("max", "mean", "none")
NORMS = ("batch", "none")
ACTIVATIONS = ("relu", "leaky")
# NRM's LeakyReLU(0.1): an "off" switch still passes 10 % top-down (docs/model.md#implementation-pitfalls)
LEAKY_SLOPE = 0.1


@dataclass(frozen=True)
class LayerSpec:
    """One bottom-up layer: conv (no bias when normalised) -> norm -> activation (a-switch) -> pool (t-switch)."""

    channels: int
    kernel: int
    padding: str = "valid"  # valid = 0, same = k//2 (Theano "half"), full = k-1
    pool: str = "none"  # max = 2x2/stride 2 with switches, mean = global mean over the map, none
    norm: str = "batch"
    activation: str = "relu"

    def __post_init__(self):
        for name, value, allowed in (
            ("padding", self.padding, PADDINGS),
            ("pool", self.pool, POOLS),
            ("norm", self.norm, NORMS),
            ("activation", self.activation, ACTIVATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"LayerSpec.{name} must be one of {allowed}, got {value!r}")
        if self.channels < 1 or self.kernel < 1:
            raise ValueError(f"LayerSpec.channels and .kernel must be >= 1, got {self.channels}, {self.kernel}")

    @property
    def pad(self) -> int:
        return {"valid": 0, "same": self.kernel // 2, "full": self.kernel - 1}[self.padding]

    @property
    def fused_pool(self) -> int:
        """The window the fused op pools over: 2 for max-pooling, 1 otherwise (mean pooling is done in torch)."""
        return 2 if self.pool == "max" else 1

    @property
    def negative_slope(self) -> float:
        return LEAKY_SLOPE if self.activation == "leaky" else 0.0


def _L(channels, kernel, padding="valid", pool="none"):
    return LayerSpec(channels, kernel, padding, pool)


# Presets. Map sizes are for 28x28 (MNIST) or 32x32 (CIFAR/SVHN) inputs; see docs/model.md#architectures-and-protocol.
PRESETS = {
    # STAND-IN (docs/model.md#architectures-and-protocol): the paper's RFM config is in its appendix I, which we
    # have not seen.
    # 1 conv layer 5x5 full (28->32), 64 ch, BN, ReLU, max-pool 2 (->16); templates over the 64x16x16 map.
    "rfm": [_L(64, 5, "full", "max")],
    # STAND-IN (docs/model.md#architectures-and-protocol): conv 5x5 full 32 ch, pool (->16) -> conv 3x3 full 64 ch
    # (->18), pool (->9).
    "drmm2": [_L(32, 5, "full", "max"), _L(64, 3, "full", "max")],
    # The 5-layer MNIST DRMM = Ladder Conv-Small (docs/model.md#architectures-and-protocol):
    # 28->32->16->14->16->8->6->1.
    "conv_small": [
        _L(32, 5, "full", "max"),
        _L(64, 3, "valid"),
        _L(64, 3, "full", "max"),
        _L(128, 3, "valid"),
        _L(10, 1, "valid", "mean"),
    ],
    # The 9-layer CIFAR-10 DRMM = Conv-Large with even maps (docs/model.md#architectures-and-protocol):
    # 32->32->34->36/18->16->18->16/8->6->6->1.
    "conv_large": [
        _L(96, 3, "same"),
        _L(96, 3, "full"),
        _L(96, 3, "full", "max"),
        _L(192, 3, "valid"),
        _L(192, 3, "full"),
        _L(192, 3, "valid", "max"),
        _L(192, 3, "valid"),
        _L(192, 1, "valid"),
        _L(10, 1, "valid", "mean"),
    ],
    # NRM AllConv13 ([DGM] nrm.py, tail kernels 3x3 as in the code; docs/model.md#nrm-architectures):
    # 32->16->8->6->1, with the NRM's LeakyReLU(0.1). The NRM's BiasAdder, dropout and top-down BN are the model
    # options bias_adder, dropout/td_dropout and td_batchnorm (off by default); its 1x1-conv classifier on the 1x1
    # pooled map is the dense readout. ``tail_kernel=1`` gives the standard conv-large's 1x1 convs for the 256/128
    # layers.
    "allconv13": [
        LayerSpec(c, 3, p, pool, activation="leaky")
        for c, p, pool in (
            (128, "same", "none"),
            (128, "same", "none"),
            (128, "same", "max"),
            (256, "same", "none"),
            (256, "same", "none"),
            (256, "same", "max"),
            (512, "valid", "none"),
            (256, "same", "none"),
            (128, "same", "mean"),
        )
    ],
}


# The AllConv13 layers after the 512 valid conv: 3x3 pad 1 in [DGM]'s code, 1x1 in the standard conv-large.
ALLCONV13_TAIL = (7, 8)


def preset_layers(
    name: str, norm: Optional[str] = None, activation: Optional[str] = None, tail_kernel: Optional[int] = None
) -> List[LayerSpec]:
    """The layer list of preset ``name``; ``norm``/``activation`` override every layer when given.

    ``tail_kernel`` (allconv13 only): kernel of the two layers after the 512 conv, 3 ([DGM] code, the preset) or 1
    (the standard 13-layer conv-large); docs/model.md#nrm-architectures, #paper-vs-code ``allconv13_tail_kernel``.
    """
    if name not in PRESETS:
        raise ValueError(f"model preset must be one of {sorted(PRESETS)}, got {name!r}")
    if tail_kernel is not None:
        if name != "allconv13":
            raise ValueError(f"tail_kernel applies to the allconv13 preset only, got model {name!r}")
        if tail_kernel not in (1, 3):
            raise ValueError(f"tail_kernel must be 1 or 3, got {tail_kernel!r}")
    layers = []
    for j, spec in enumerate(PRESETS[name]):
        d = asdict(spec)
        if tail_kernel is not None and j in ALLCONV13_TAIL:
            d["kernel"] = tail_kernel
        if norm is not None:
            d["norm"] = norm
        if activation is not None:
            d["activation"] = activation
        layers.append(LayerSpec(**d))
    return layers


@dataclass
class Latents:
    """What the bottom-up pass hands to ``render``: per-layer switches and the sizes needed to invert each layer.

    ``switches[i]`` is layer i's uint8 switch map (bits 0-3 argmax offset, bit 7 the ``a`` switch; for layers
    without max-pooling the offset is 0 and only the ``a`` bit matters). ``input_sizes[i]`` is the (H, W) of layer
    i's input, ``map_sizes[i]`` of the map before any mean pooling. Switches carry no gradient (E-step constants).
    """

    switches: List[Tensor]
    input_sizes: List[Tuple[int, int]]
    map_sizes: List[Tuple[int, int]]
    features: Tensor  # the top feature map h (N, K, H, W) the readout sees
    # Each layer's input (with its autograd history), recorded only when ``DRMM.record_layer_inputs`` is True
    # (the moment-matching objective recomputes the pre-BN conv outputs from them); None otherwise.
    layer_inputs: Optional[List[Tensor]] = None
    branch: str = "max"  # which bottom-up branch recorded these ("min" = the Max-Min model's min branch)
    # Max-Min models only: the min branch's latents and the two branches' logits (max, min).
    min_branch: Optional["Latents"] = None
    branch_logits: Optional[Tuple[Tensor, Tensor]] = None


class DRMM(nn.Module):
    """Bottom-up ``forward(x) -> (logits, latents)`` and top-down ``render(latents, classes)``.

    Args:
        layers: the layer specs, bottom to top.
        in_channels, image_size: the input (C, H, W) without the batch dimension.
        num_classes: number of class templates.
        mean_unpool_scale: inverse of a mean pool: ``none`` = repeat unscaled ([TF], default) or ``inv_area`` =
            repeat times 1/area, the adjoint of averaging ([DGM]).
        td_relu: ReLU on the top-down signal before each layer's masking and on the image (the paper's NN-DRMM,
            [P16] §3.2); off by default, as in the authors' code, which uses a penalty instead.
        bn_momentum: PyTorch-convention momentum of the BN running statistics (0.1; [TF] keeps an EMA with decay
            0.99, i.e. 0.01 here). A number: this package does not use the cumulative average (momentum=None).
        td_batchnorm: NRM top-down BatchNorm ([DGM], docs/model.md#nrm-flavour): an untied, learned ``BatchNorm2d``
            (own running statistics) after the class template and after every layer's transposed conv, the image
            included.
            Off by default ([TF] has none).
        bias_adder: NRM's BiasAdder: an extra learned per-channel bias after each BN, before the activation; it is
            the ``b`` of the RPN term. Off by default (the BN beta is the bias). BN layers only.
        dropout: bottom-up dropout probability after each max-pooling stage (NRM CIFAR/SVHN: 0.5); 0 = off.
        td_dropout: top-down dropout probability before each max-pooled layer's unpooling, independent of the
            bottom-up masks (NRM: 0.5); 0 = off.
        maxmin: NRM's Max-Min model ([DGM] nrm_maxmin.py, docs/model.md#loss-terms): a second bottom-up "min"
            branch sharing the conv weights, BiasAdder and readout, with its own BNs (and top-down BNs), activation
            ``min(v, 0) + slope * max(v, 0)`` and min-pooling; ``forward`` returns the average of the two
            branches' logits and keeps both branches' latents. The min branch runs on the negated signal, where it
            is exactly a max branch (see ``_layer_forward``), so the fused kernels serve it unchanged; its switch
            offsets are the window argmin (the [DGM] code takes the argmax there, a quirk not copied).
    """

    def __init__(
        self,
        layers: Sequence[LayerSpec],
        in_channels: int,
        image_size: Tuple[int, int],
        num_classes: int = 10,
        mean_unpool_scale: str = "none",
        td_relu: bool = False,
        bn_momentum: float = 0.1,
        td_batchnorm: bool = False,
        bias_adder: bool = False,
        dropout: float = 0.0,
        td_dropout: float = 0.0,
        maxmin: bool = False,
    ):
        super().__init__()
        if not layers:
            raise ValueError("layers must hold at least one LayerSpec")
        if not isinstance(bn_momentum, (int, float)) or not 0.0 <= bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be a number in [0, 1], got {bn_momentum!r}")
        if mean_unpool_scale not in ("none", "inv_area"):
            raise ValueError(f"mean_unpool_scale must be 'none' or 'inv_area', got {mean_unpool_scale!r}")
        for name, p in (("dropout", dropout), ("td_dropout", td_dropout)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
        self.specs = list(layers)
        self.in_channels, self.image_size, self.num_classes = in_channels, tuple(image_size), num_classes
        self.mean_unpool_scale, self.td_relu = mean_unpool_scale, td_relu
        self.convs = nn.ModuleList()
        self.map_sizes = []  # per layer, the conv output size (before pooling)
        c, hw = in_channels, tuple(image_size)
        for i, spec in enumerate(self.specs):
            if spec.pool == "mean" and i != len(self.specs) - 1:
                raise ValueError(f"layer {i}: a global mean pool is only allowed on the last layer")
            if spec.norm == "batch":
                layer = dk.FusedConvBNReLUPool2d(
                    c,
                    spec.channels,
                    spec.kernel,
                    padding=spec.pad,
                    pool=spec.fused_pool,
                    negative_slope=spec.negative_slope,
                    momentum=bn_momentum,
                )
            else:
                layer = dk.FusedConvReLUPool2d(
                    c,
                    spec.channels,
                    spec.kernel,
                    padding=spec.pad,
                    bias=True,
                    pool=spec.fused_pool,
                    negative_slope=spec.negative_slope,
                )
            self.convs.append(layer)
            conv_hw = tuple(s + 2 * spec.pad - spec.kernel + 1 for s in hw)
            self.map_sizes.append(conv_hw)
            hw = (1, 1) if spec.pool == "mean" else tuple(s // spec.fused_pool for s in conv_hw)
            if min(hw) < 1:
                raise ValueError(f"layer {i} ({spec}) maps input {image_size} to an empty feature map")
            c = spec.channels
        self.top_shape = (c, *hw)  # shape of the class templates mu_c
        # Set by the trainer when nonneg_term='moment_matching': forward then keeps each layer's input in the
        # latents (references only; autograd keeps these tensors alive for the backward pass anyway).
        self.record_layer_inputs = False
        self.readout = nn.Linear(c * hw[0] * hw[1], num_classes)
        self.dropout, self.td_dropout, self.td_batchnorm, self.maxmin = (
            float(dropout),
            float(td_dropout),
            bool(td_batchnorm),
            bool(maxmin),
        )
        bn_layers = [str(i) for i, layer in enumerate(self.convs) if isinstance(layer, dk.FusedConvBNReLUPool2d)]
        if bias_adder and not bn_layers:
            raise ValueError(
                "bias_adder needs BatchNorm layers (norm='batch'); layers without normalisation "
                "already have a conv bias"
            )
        self.bias_adders = (
            nn.ParameterDict({i: nn.Parameter(torch.zeros(self.specs[int(i)].channels)) for i in bn_layers})
            if bias_adder
            else None
        )
        self.td_norms = self._top_down_norms(bn_momentum) if td_batchnorm else None
        self.min_convs = self.min_td_norms = None
        if maxmin:
            self.min_convs = nn.ModuleDict()  # the min branch's own BNs around the shared (tied) conv modules
            for i in bn_layers:
                layer = self.convs[int(i)]
                twin = dk.FusedConvBNReLUPool2d(
                    layer.conv.in_channels,
                    layer.conv.out_channels,
                    1,
                    pool=layer.pool,
                    negative_slope=layer.negative_slope,
                    momentum=bn_momentum,
                    eps=layer.bn.eps,
                )
                twin.conv = layer.conv  # the same module: weights tied, geometry taken from it
                self.min_convs[i] = twin
            self.min_td_norms = self._top_down_norms(bn_momentum) if td_batchnorm else None
        self.reset_parameters()

    def _top_down_norms(self, momentum: float) -> nn.ModuleList:
        """One BatchNorm2d per rendered level: the template, then the input of layers L-1 .. 0 (the image)."""
        chans = [self.top_shape[0]] + [
            self.in_channels if i == 0 else self.specs[i - 1].channels for i in reversed(range(len(self.specs)))
        ]
        return nn.ModuleList(nn.BatchNorm2d(c, momentum=momentum) for c in chans)

    def reset_parameters(self):
        # Xavier conv weights and zero biases, as both codebases initialise (docs/model.md#architectures-and-protocol).
        for layer in self.convs:
            nn.init.xavier_uniform_(self.conv_weight(layer))
            if isinstance(layer, dk.FusedConvReLUPool2d) and layer.bias is not None:
                nn.init.zeros_(layer.bias)
        nn.init.xavier_uniform_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)

    @staticmethod
    def conv_weight(layer: nn.Module) -> Tensor:
        """The raw (tied) conv weight of a fused layer: used bottom-up and, transposed, top-down."""
        return layer.conv.weight if isinstance(layer, dk.FusedConvBNReLUPool2d) else layer.weight

    # ------------------------------------------------------------------ bottom-up (E-step inference)

    def forward(self, x: Tensor) -> Tuple[Tensor, Latents]:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.image_size):
            raise ValueError(
                f"x must have shape (N, {self.in_channels}, {self.image_size[0]}, "
                f"{self.image_size[1]}), got {tuple(x.shape)}"
            )
        logits, latents = self._bottom_up(x, "max")
        if self.maxmin:
            # Prediction = the average of the two branches' logits ([DGM] nrm_maxmin.py); each keeps its own latents.
            logits_min, latents.min_branch = self._bottom_up(x, "min")
            latents.branch_logits = (logits, logits_min)
            logits = 0.5 * (logits + logits_min)
        return logits, latents

    def _bottom_up(self, x: Tensor, branch: str) -> Tuple[Tensor, Latents]:
        switches, input_sizes, map_sizes = [], [], []
        inputs: Optional[List[Tensor]] = [] if self.record_layer_inputs else None
        negated = branch == "min"
        h = -x if negated else x  # the min branch runs on the negated signal (see _layer_forward)
        for i, spec in enumerate(self.specs):
            input_sizes.append(tuple(h.shape[-2:]))
            if inputs is not None:
                inputs.append(-h if negated else h)
            h, sw = self._layer_forward(i, h, negated)
            map_sizes.append(tuple(h.shape[-2:]))
            switches.append(sw)
            if spec.pool == "mean":
                h = h.mean(dim=(2, 3), keepdim=True)
            elif spec.pool == "max" and self.dropout:
                h = F.dropout(h, self.dropout, self.training)
        if negated:
            h = -h
        logits = self.readout(h.flatten(1))
        return logits, Latents(switches, input_sizes, map_sizes, h, inputs, branch=branch)

    def _layer_forward(self, i: int, h: Tensor, negated: bool) -> Tuple[Tensor, Tensor]:
        """Layer i's fused op: (output, switches). ``negated``: the min branch, fed and returning ``-signal``.

        With u = -v (v = the min branch's pre-activation), ``min(v,0) + s*max(v,0) = -act(u)`` and min-pooling it
        is ``-maxpool(act(u))``. For an input ``-h``, ``u = conv(h)*scale + (-beta' - b)`` for a BN layer with its
        own parameters (beta' = -beta reparametrised, so its init is still 0) and ``conv(h) - c`` without BN. So the
        min branch is the ordinary fused op on the negated signal with negated shifts: its on-bit is ``v < 0``
        and its offset the window argmin of ``v``, exactly the min branch's a- and t-switches.
        """
        layer = self.convs[i]
        if isinstance(layer, dk.FusedConvBNReLUPool2d):
            b = self.bias_adders[str(i)] if self.bias_adders is not None else None
            if negated:
                return self.min_convs[str(i)](h, return_switches=True, shift=None if b is None else -b)
            return layer(h, return_switches=True, shift=b)
        if negated:
            return dk.conv_relu_pool(
                h,
                layer.weight,
                None,
                None if layer.bias is None else -layer.bias,
                stride=layer.stride,
                padding=layer.padding,
                pool=layer.pool,
                negative_slope=layer.negative_slope,
            )
        return layer(h, return_switches=True)

    # ------------------------------------------------------------------ NRM objective helpers (MM, RPN)
    # docs/model.md#loss-terms

    def layer_bias(self, i: int) -> Optional[Tensor]:
        """The bias b of layer i: the BiasAdder when on, else the BN beta for BN layers, the conv bias otherwise."""
        layer = self.convs[i]
        if self.bias_adders is not None and str(i) in self.bias_adders:
            return self.bias_adders[str(i)]
        return layer.bn.bias if isinstance(layer, dk.FusedConvBNReLUPool2d) else layer.bias

    def preactivation_conv(self, i: int, h: Tensor) -> Tensor:
        """Layer i's conv output for input h: pre-BN (no bias) for BN layers, conv + bias otherwise."""
        layer, spec = self.convs[i], self.specs[i]
        bias = None if isinstance(layer, dk.FusedConvBNReLUPool2d) else layer.bias
        return F.conv2d(h, self.conv_weight(layer), bias, padding=spec.pad)

    def forward_conv_outputs(self, latents: Latents) -> List[Tensor]:
        """Recompute each layer's pre-BN conv output from the recorded inputs (one extra conv per layer).

        The fused ops do not expose the pre-BN conv output, so it is recomputed with ``F.conv2d``; it keeps its
        autograd history (gradients reach the conv weights and, through the recorded inputs, the layers below), as
        the NRM code differentiates the moment-matching term through the forward activations too.
        """
        if latents.layer_inputs is None:
            raise ValueError("the latents hold no layer inputs: set model.record_layer_inputs = True before forward")
        return [self.preactivation_conv(i, h) for i, h in enumerate(latents.layer_inputs)]

    @torch.no_grad()
    def prior_path_latents(self, latents: Latents) -> Latents:
        """Switches of the RPN prior path: a-switches of an all-zero image, t-switches of the real input.

        The zero image's bottom-up pass normalises with the BN *running* statistics (eval-mode BN). The NRM code
        uses InstanceNorm there; instance (or batch) statistics of a constant zero image are degenerate (the first
        conv output is identically 0), so eval-mode BN is used instead, which is what the zero image means to the
        trained network. The zero image is passed as one example (every example's zero pass is identical); its
        own max-pools propagate it upwards, and each layer's ``a`` is read at the real input's argmax offset, so the
        prior path shares the real input's t-switches. Constants (no gradient), like every switch.
        """
        n = latents.switches[0].shape[0]
        ref = latents.switches[0].device
        w0 = self.conv_weight(self.convs[0])
        h = torch.zeros(1, self.in_channels, *self.image_size, device=ref, dtype=w0.dtype)
        out = []
        for i, (spec, layer) in enumerate(zip(self.specs, self.convs)):
            v = self.preactivation_conv(i, h)
            if isinstance(layer, dk.FusedConvBNReLUPool2d):
                bn = layer.bn
                v = F.batch_norm(v, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
                if self.bias_adders is not None:
                    v = v + self.bias_adders[str(i)].view(1, -1, 1, 1)
            on = (v > 0).to(torch.uint8)  # (1, C, H, W) a-switch of the zero image
            sw = latents.switches[i]
            p = spec.fused_pool
            if p > 1:
                off = (sw & OFFSET_MASK).long()
                dy, dx = torch.div(off, p, rounding_mode="floor"), off % p
                hp, wp = sw.shape[-2:]
                rows = torch.arange(hp, device=ref).view(hp, 1) * p + dy
                cols = torch.arange(wp, device=ref).view(1, wp) * p + dx
                idx = rows * v.shape[-1] + cols  # flat index into the conv map, (N, C, hp, wp)
                a = on.flatten(2).expand(n, -1, -1).gather(2, idx.flatten(2)).view_as(sw)
            else:
                a = on.expand_as(sw)
            out.append((sw & OFFSET_MASK) | (a * ON_BIT))
            act = F.leaky_relu(v, spec.negative_slope) if spec.negative_slope > 0 else F.relu(v)
            h = F.max_pool2d(act, p, p) if p > 1 else act
        return Latents(out, latents.input_sizes, latents.map_sizes, latents.features)

    def prior_template(self) -> Tensor:
        """The RPN prior path's top signal: the all-ones class vector through the readout = the sum of templates."""
        return self.readout.weight.sum(0).view(1, *self.top_shape)

    def switch_mask(self, i: int, switches: Tensor, dtype: torch.dtype) -> Tensor:
        """The a-mask of layer i from its switch bytes: 1 where on, the activation's slope (0 or 0.1) where off."""
        return dk.reference.activation_factor(switches, self.specs[i].negative_slope, dtype)

    # ------------------------------------------------------------------ top-down (rendering)

    def class_templates(self, classes: Tensor) -> Tensor:
        """mu_c for each entry of ``classes``: the readout weight column of class c, shaped like the top map."""
        if classes.dtype != torch.long or classes.dim() != 1:
            raise ValueError(f"classes must be a 1-D int64 tensor, got {classes.dtype} of shape {tuple(classes.shape)}")
        # A one-hot product rather than weight[classes]: indexing's backward accumulates repeated classes in a
        # thread-dependent order on CPU, so identical runs drifted apart; the product's backward is a fixed GEMM.
        w = self.readout.weight
        one_hot = F.one_hot(classes, w.shape[0]).to(w.dtype)
        return (one_hot @ w).view(len(classes), *self.top_shape)

    def top_templates(self, latents: Latents, classes: Tensor) -> Tensor:
        """The signal rendered from the top for each example: mu_c here; a factor model adds its factors."""
        return self.class_templates(classes)

    def render(
        self,
        latents: Latents,
        classes: Tensor,
        return_levels: bool = False,
        templates: Optional[Tensor] = None,
        frozen_norms: bool = False,
    ):
        """Render class templates top-down through the switches: returns x_hat (and the levels on request).

        ``levels[0]`` is the class template, ``levels[i]`` the signal rendered down to the input of layer L-i
        (before that layer's own unpool/mask, and before the optional top-down ReLU), ``levels[-1]`` = x_hat.
        The switches and ``classes`` are constants; gradients reach the conv weights and the templates.
        ``templates`` (N, *top_shape) replaces the top signal (sampling, class appearance models).
        With ``td_batchnorm`` every level is taken after its top-down BN (the min branch's latents use the min
        branch's own top-down BNs); ``td_dropout`` acts before each max-pooled layer's unpooling, after the level
        is recorded. ``frozen_norms``: the top-down BNs normalise with their running statistics and leave them
        untouched (the RPN prior path, which must not feed its statistics into the BNs of the real path).
        """
        if len(classes) != latents.switches[0].shape[0]:
            raise ValueError(
                f"classes has {len(classes)} entries but the latents hold {latents.switches[0].shape[0]} examples"
            )

        def normalise(j: int, t: Tensor) -> Tensor:
            return self.top_down_norm(j, t, latents.branch, frozen_norms)

        mu = normalise(0, self.top_templates(latents, classes) if templates is None else templates)
        levels = [mu]
        for j, i in enumerate(reversed(range(len(self.specs))), start=1):
            spec, layer = self.specs[i], self.convs[i]
            if self.td_relu:
                mu = F.relu(mu)
            if spec.pool == "mean":
                mu = self.mean_unpool(mu, latents.map_sizes[i])
            elif spec.pool == "max" and self.td_dropout:
                mu = F.dropout(mu, self.td_dropout, self.training)
            mu = dk.render(
                mu,
                latents.switches[i],
                self.conv_weight(layer),
                None,
                padding=spec.pad,
                pool=spec.fused_pool,
                out_size=latents.input_sizes[i],
                negative_slope=spec.negative_slope,
                check_switches=False,  # latents.switches were recorded by forward: skip the per-call byte check
            )
            mu = normalise(j, mu)
            levels.append(mu)
        x_hat = F.relu(mu) if self.td_relu else mu
        if return_levels:
            levels[-1] = x_hat
            return x_hat, levels
        return x_hat

    def top_down_norm(self, j: int, t: Tensor, branch: str = "max", frozen: bool = False) -> Tensor:
        """Rendered level j through its top-down BN (``td_batchnorm``; identity without). ``frozen``: normalise
        with the running statistics and leave them untouched."""
        norms = self.min_td_norms if branch == "min" else self.td_norms
        if norms is None:
            return t
        bn = norms[j]
        if frozen:
            return F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return bn(t)

    def mean_unpool(self, mu: Tensor, map_size: Tuple[int, int]) -> Tensor:
        """Inverse of the global mean pool: repeat over the map, optionally times 1/area (option mean_unpool_scale)."""
        mu = mu.expand(-1, -1, *map_size)
        if self.mean_unpool_scale == "inv_area":
            mu = mu / (map_size[0] * map_size[1])
        return mu

    def unpooled_signals(self, levels: Sequence[Tensor]) -> List[Tensor]:
        """The unmasked, unpooled top-down signal entering each layer, top first (what the NN penalty acts on).

        The unpooled signal is a nearest-neighbour repeat of the level (2x2 for max-pooled layers, the whole map for
        the mean-pooled one), and a per-element mean over a repeat equals the mean over the level, so the level is
        returned as is -- divided by the map area where ``mean_unpool_scale='inv_area'`` scales the repeat.
        """
        signals = []
        for level, i in zip(levels, reversed(range(len(self.specs)))):
            if self.specs[i].pool == "mean" and self.mean_unpool_scale == "inv_area":
                h, w = self.map_sizes[i]
                level = level / (h * w)
            signals.append(level)
        return signals

    def extra_repr(self) -> str:
        extra = [
            f"{k}={v}"
            for k, v in (
                ("td_batchnorm", self.td_batchnorm),
                ("bias_adder", self.bias_adders is not None),
                ("dropout", self.dropout),
                ("td_dropout", self.td_dropout),
                ("maxmin", self.maxmin),
            )
            if v
        ]
        return ", ".join(
            [f"top_shape={self.top_shape}, mean_unpool_scale={self.mean_unpool_scale}, td_relu={self.td_relu}"] + extra
        )


def build_model(
    name: str,
    in_channels: int,
    image_size: Tuple[int, int],
    num_classes: int = 10,
    *,
    norm: Optional[str] = None,
    activation: Optional[str] = None,
    tail_kernel: Optional[int] = None,
    **model_kwargs,
) -> DRMM:
    """A DRMM from preset ``name`` (see PRESETS); ``model_kwargs`` go to ``DRMM`` (mean_unpool_scale, td_relu, ...)."""
    return DRMM(
        preset_layers(name, norm, activation, tail_kernel), in_channels, image_size, num_classes, **model_kwargs
    )
